"""The README and docs/ point at things that exist: relative links, repository paths in backticks, and the tests
they cite as evidence (a renamed or removed test must not leave a guarantee without its check)."""
import ast
import glob
import os
import re

import pytest

_ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
_PAGES = ['README.md'] + sorted(os.path.relpath(p, _ROOT) for p in glob.glob(os.path.join(_ROOT, 'docs', '*.md')))
_TOP = ('immiscible_jax/', 'configs/', 'launch/', 'benchmarks/', 'tests/', 'tools/', 'results/', 'docs/')


def _text(page):
  with open(os.path.join(_ROOT, page)) as f:
    return f.read()


def _test_names():
  names = set()
  for path in glob.glob(os.path.join(_ROOT, 'tests', '*.py')):
    tree = ast.parse(_text(os.path.relpath(path, _ROOT)))
    names.update(n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith('test_'))
  return names


def test_the_readme_is_a_front_page():
  assert len(_text('README.md').splitlines()) <= 150


@pytest.mark.parametrize('page', _PAGES)
def test_relative_links_lead_to_files(page):
  folder = os.path.dirname(os.path.join(_ROOT, page))
  for target in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', _text(page)):
    assert os.path.exists(os.path.join(folder, target)), f'{page}: link to {target}, which does not exist'


@pytest.mark.parametrize('page', _PAGES)
def test_repository_paths_in_backticks_exist(page):
  for path in re.findall(r'`((?:%s)[\w./-]*\.(?:py|md|json|sh|txt))' % '|'.join(map(re.escape, _TOP)), _text(page)):
    if '<' not in path and '*' not in path:
      assert os.path.exists(os.path.join(_ROOT, path)), f'{page}: `{path}` does not exist'


@pytest.mark.parametrize('page', _PAGES)
def test_cited_tests_exist(page):
  defined = _test_names()
  cited = set(re.findall(r'`(?:tests/\w+\.py::)?(test_\w+)', _text(page)))
  missing = sorted(cited - defined - {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(
      os.path.join(_ROOT, 'tests', 'test_*.py'))})
  assert not missing, f'{page} cites tests that do not exist: {missing}'
