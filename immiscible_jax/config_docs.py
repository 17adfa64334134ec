"""Prints the config reference (every key, its default, its meaning) as Markdown, from configs/default.py.

  python -m immiscible_jax.config_docs        # the table the README shows; tests/test_configs.py keeps them equal
The meaning of a key is the comment block above it in configs/default.py, so the two cannot drift apart.
"""
import re

from immiscible_jax import config_checks


_ASSIGNMENT = re.compile(r'^\s*(\w+)\.(\w+)\s*=')
_SECTION = {'config': '', 'eval_config': 'eval.'}


def reference_rows():
  """[(key, default repr, meaning)] in file order. Meaning: the comment lines above the assignment, shared by
  consecutive assignments under one comment."""
  defaults = config_checks.flatten(config_checks.default_config())
  rows, comment, shared = [], [], False
  for line in open(config_checks._DEFAULT_CONFIG):  # pylint: disable=protected-access
    text = line.strip()
    match = _ASSIGNMENT.match(line)
    if text.startswith('#'):
      comment = [] if shared else comment
      shared = False
      comment.append(text.lstrip('#').strip())
      continue
    if match:
      owner, name = match.groups()
      key = _SECTION.get(owner, owner + '.') + name
      if key in defaults:
        rows.append((key, repr(defaults[key]), ' '.join(comment)))
      shared = True
    else:
      comment, shared = [], False
  return rows


def markdown():
  lines = ['| key | default | meaning |', '|---|---|---|']
  lines += [f'| `{k}` | `{v}` | {m} |' for k, v, m in reference_rows()]
  return '\n'.join(lines)


if __name__ == '__main__':
  print(markdown())
