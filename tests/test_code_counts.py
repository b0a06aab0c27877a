"""benchmarks/code_counts.py counts code lines (not blank, comment or docstring) and raise statements."""
from benchmarks.code_counts import code_lines_and_raises

SOURCE = '''"""Module docstring,
two lines."""
import os  # a comment after code is code


def f(x):
    """Docstring."""
    # a comment line
    if x < 0:
        raise ValueError(
            "negative")

    return os.sep


class C:
    """Docstring."""
    text = """not a docstring:
    a string value"""

    def g(self):
        raise NotImplementedError
'''


def test_counts_code_lines_without_docstrings_comments_or_blanks():
    # Code lines: import, def f, if, raise (2 lines), return, class C, text = (2 lines), def g, raise = 11.
    assert code_lines_and_raises(SOURCE) == (11, 2)


def test_an_empty_module_has_no_code():
    assert code_lines_and_raises('"""Only a docstring."""\n\n# and a comment\n') == (0, 0)
