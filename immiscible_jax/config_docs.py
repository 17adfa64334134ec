"""Prints the config reference (every key, its default, its meaning) as Markdown, from configs/default.py.

  python -m immiscible_jax.config_docs        # the table the README shows; tests/test_configs.py keeps them equal
The meaning of a key is the comment block directly above its assignment in configs/default.py, so the two
cannot drift apart. Every key needs a comment of its own: a key whose line follows another assignment (a
comment shared by several keys) or a blank line is refused, naming the key.
"""
import inspect
import re

from immiscible_jax import config_checks

_ASSIGNMENT = re.compile(r'^\s*(\w+)\.(\w+)\s*=')
_SECTION = {'config': '', 'eval_config': 'eval.'}


class UndocumentedKeyError(ValueError):
  pass


def default_config_path():
  """The source file of configs/default.py, wherever the package `configs` is installed."""
  from configs import default  # pylint: disable=g-import-not-at-top
  return inspect.getsourcefile(default)


def reference_rows(path=None):
  """[(key, default repr, meaning)] in file order. Meaning: the comment lines directly above the key's
  assignment. Raises UndocumentedKeyError for a key without a comment of its own."""
  path = path or default_config_path()
  defaults = config_checks.flatten(config_checks.default_config())
  rows, comment = [], []
  with open(path) as f:
    lines = f.read().splitlines()
  for number, line in enumerate(lines, start=1):
    text = line.strip()
    if text.startswith('#'):
      comment.append(text.lstrip('#').strip())
      continue
    match = _ASSIGNMENT.match(line)
    if match:
      owner, name = match.groups()
      key = _SECTION.get(owner, owner + '.') + name
      if key in defaults:
        if not comment:
          raise UndocumentedKeyError(
              f'{path}:{number}: config key {key} has no comment of its own; write one directly above it '
              '(its meaning, unit and allowed values)')
        rows.append((key, repr(defaults[key]), ' '.join(comment)))
    comment = []
  missing = sorted(set(defaults) - {key for key, _, _ in rows})
  if missing:
    raise UndocumentedKeyError(f'{path}: keys not assigned as `section.key = value`: {missing}')
  return rows


def _cell(text):
  """A Markdown table cell: pipes escaped, and '<' so that it cannot open an HTML tag."""
  return text.replace('|', r'\|').replace('<', '&lt;')


def markdown(path=None):
  lines = ['| key | default | meaning |', '|---|---|---|']
  lines += [f'| `{k}` | `{v}` | {_cell(m)} |' for k, v, m in reference_rows(path)]
  return '\n'.join(lines)


if __name__ == '__main__':
  print(markdown())
