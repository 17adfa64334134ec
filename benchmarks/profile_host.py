r"""Where the training loop's host time goes, from a trace written by profile.start_step / profile.num_steps.

  python -m immiscible_jax.main --config=configs/digits.py --workdir=/tmp/p1 --config.profile.num_steps=20 ...
  python benchmarks/profile_host.py /tmp/p1/profile [--json OUT]

Reads the newest perfetto_trace.json.gz under the folder (jax.profiler's trace with the Python tracer's function
calls) and reports, over the traced dispatches (the loop's StepTraceAnnotation 'train' events):
  device    the union of the XLA executor threads' op events: busy time, and the idle gaps between them, each gap
            attributed to what the loop's thread was doing while the device waited (the innermost loop phase
            below that overlaps it most);
  host      the loop thread's time in its phases: the dispatch call of the compiled step ('train' annotation),
            reading and putting the next batches (prefetch __next__), waiting for the device
            (layouts.wait_until_ready), logging (fetch of the metrics, writer), saving, and the rest.
XLA:CPU runs ops on its own threads (one pool per device); a GPU or TPU trace puts device ops under a separate
'/device:' process, which counts as device here too. On XLA:CPU each program execution is one event, so the
time between consecutive executions (the device waiting for the next dispatch) is reported as well.
"""
import argparse
import glob
import gzip
import json
import os
import statistics

EXECUTION = 'ThunkExecutor::Execute (wait for completion)'
# Loop phases, by the Python function the tracer names ('$file.py:line function'); the first match wins.
PHASES = (('dispatch', ('train',)),
          ('input', ('prefetch.py', '__next__')),
          ('wait for the device', ('layouts.py', 'wait_until_ready')),
          ('log', ('layouts.py', 'fetch_stacked')),
          ('log', ('metric_writer.py', 'write')),
          ('save', ('checkpointing.py', 'save')),
          ('save', ('layouts.py', 'host_state')),
          ('flops accounting', ('perf.py', 'train_step_accounting')))


def _events(folder):
  paths = sorted(glob.glob(os.path.join(folder, '**', 'perfetto_trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise SystemExit(f'no perfetto_trace.json.gz under {folder}')
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  return paths[-1], trace['traceEvents'] if isinstance(trace, dict) else trace


def _phase(event):
  name = event.get('name', '')
  for phase, needles in PHASES:
    if all(n in name for n in needles) and (name == 'train' or name.startswith('$') or phase != 'dispatch'):
      return phase
  return None


def _union(intervals):
  out = []
  for start, end in sorted(intervals):
    if out and start <= out[-1][1]:
      out[-1][1] = max(out[-1][1], end)
    else:
      out.append([start, end])
  return out


def analyse(folder):
  path, events = _events(folder)
  names = {(e['pid'], e.get('tid')): e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') in ('thread_name', 'process_name')}
  spans = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  steps = [e for e in spans if e['name'] == 'train']
  if not steps:
    raise SystemExit(f'{path}: no train step annotations (is this a trace of the training loop?)')
  loop = (steps[0]['pid'], steps[0]['tid'])
  start, end = steps[0]['ts'], max(e['ts'] + e['dur'] for e in steps)
  is_device = lambda e: ('/device:' in names.get((e['pid'], None), '') or (
      (e['pid'], e['tid']) != loop and not e['name'].startswith(('$', 'Threadpool')) and e['dur'] > 0))
  busy = _union([(e['ts'], e['ts'] + e['dur']) for e in spans if is_device(e) and e['ts'] < end])
  # The window ends where the traced device work ends (the trace stops after waiting for the last dispatch).
  end = max(end, busy[-1][1]) if busy else end
  busy = [(max(s, start), min(t, end)) for s, t in busy if t > start]
  gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:])]
  if busy and busy[0][0] > start:
    gaps.insert(0, (start, busy[0][0]))
  host = [(e['ts'], e['ts'] + e['dur'], _phase(e)) for e in spans if (e['pid'], e['tid']) == loop and _phase(e)]
  # Outermost occurrences only (a phase inside another phase, e.g. a save's write inside a log, counts once).
  outer = []
  for s, t, phase in sorted(host, key=lambda x: (x[0], -x[1])):
    if not outer or s >= outer[-1][1]:
      outer.append((s, t, phase))
  host_time = {}
  for s, t, phase in outer:
    overlap = max(0.0, min(t, end) - max(s, start))
    host_time[phase] = host_time.get(phase, 0.0) + overlap
  gap_cause = {}
  for s, t in gaps:
    best = max(outer, key=lambda h: max(0.0, min(h[1], t) - max(h[0], s)), default=None)
    cause = best[2] if best and min(best[1], t) > max(best[0], s) else 'other host work'
    gap_cause[cause] = gap_cause.get(cause, 0.0) + (t - s)
  # XLA:CPU marks each program execution ('ThunkExecutor::Execute (wait for completion)' on a PjRt client
  # thread): the time from one execution's end to the next one's start is the device waiting for the host.
  runs = sorted((e['ts'], e['ts'] + e['dur']) for e in spans if e['name'] == EXECUTION and start <= e['ts'] < end)
  between = [max(0.0, b[0] - a[1]) for a, b in zip(runs, runs[1:])]
  window = end - start
  ms = lambda us: round(us / 1e3, 2)
  executions = dict(count=len(runs), between_ms_total=ms(sum(between)),
                    between_ms_median=ms(statistics.median(between)) if between else None,
                    between_ms_max=ms(max(between)) if between else None)
  return dict(trace=path, dispatches=len(steps), window_ms=ms(window), device_busy_ms=ms(sum(t - s for s, t in busy)),
              device_idle_ms=ms(window - sum(t - s for s, t in busy)), gaps=len(gaps),
              gap_ms_median=ms(statistics.median([t - s for s, t in gaps])) if gaps else 0.0,
              idle_by_host_phase_ms={k: ms(v) for k, v in sorted(gap_cause.items(), key=lambda kv: -kv[1])},
              host_phase_ms={k: ms(v) for k, v in sorted(host_time.items(), key=lambda kv: -kv[1])},
              host_other_ms=ms(window - sum(host_time.values())), executions=executions)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('folders', nargs='+', help='WORKDIR/profile folders (or any folder above a trace)')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  rows = [analyse(folder) for folder in args.folders]
  for folder, r in zip(args.folders, rows):
    print(f"\n{folder}: {r['dispatches']} dispatches in {r['window_ms']} ms; device busy {r['device_busy_ms']} ms, "
          f"idle {r['device_idle_ms']} ms in {r['gaps']} gaps (median {r['gap_ms_median']} ms)")
    print('  device idle while the loop was in: ' + ', '.join(f'{k} {v} ms' for k, v in r['idle_by_host_phase_ms'].items()))
    print('  loop thread: ' + ', '.join(f'{k} {v} ms' for k, v in r['host_phase_ms'].items()) +
          f", other {r['host_other_ms']} ms")
    x = r['executions']
    if x['count']:
      print(f"  XLA:CPU executions: {x['count']}, idle between consecutive ones {x['between_ms_total']} ms in all "
            f"(median {x['between_ms_median']} ms, max {x['between_ms_max']} ms)")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(rows=rows), f, indent=1)


if __name__ == '__main__':
  main()
