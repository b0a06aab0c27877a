"""Size figures of the code: raises per 1,000 code lines and the length of the training path.

    python benchmarks/code_counts.py [--root .]

- raises / 1k code lines over libs/, the top-level *.py and tools/: `raise` statements (ast.Raise) per
  1,000 code lines, a code line being one that is not blank, not only a comment and not part of a
  docstring (the first string statement of a module, class or function).
- the training path: the lines (as `wc -l`) of the files a training run goes through, TRAINING_PATH.
"""
import argparse
import ast
import glob
import io
import os
import tokenize

TRAINING_PATH = ('train.py', 'train_ldm.py', 'train_ldm_discrete.py', 'train_t2i_discrete.py', 'libs/trainer.py',
                 'libs/family.py', 'libs/sampling.py', 'sde.py', 'dpm_solver_pp.py', 'libs/nnet.py', 'libs/uvit.py',
                 'libs/uvit_t2i.py', 'libs/uvit_layers.py', 'libs/attention.py', 'libs/data_loader.py',
                 'libs/optim.py', 'libs/ema.py', 'libs/checkpoint.py', 'libs/config_utils.py', 'libs/preemption.py')


def code_lines_and_raises(source: str):
    """(number of code lines, number of raise statements) of a Python source."""
    tree = ast.parse(source)
    docstring_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    raises = sum(isinstance(node, ast.Raise) for node in ast.walk(tree))
    return len(code - docstring_lines), raises


def counted_files(root: str):
    """libs/**/*.py, the top-level *.py and tools/**/*.py."""
    patterns = ('libs/**/*.py', '*.py', 'tools/**/*.py')
    return sorted({p for pattern in patterns for p in glob.glob(os.path.join(root, pattern), recursive=True)})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    lines = raises = 0
    for path in counted_files(args.root):
        with open(path, encoding='utf-8') as f:
            n, r = code_lines_and_raises(f.read())
        lines, raises = lines + n, raises + r
    print(f"libs/, top-level *.py, tools/: {raises} raises in {lines} code lines = "
          f"{1000 * raises / lines:.1f} per 1,000")
    path_lines = 0
    for name in TRAINING_PATH:
        with open(os.path.join(args.root, name), encoding='utf-8') as f:
            path_lines += len(f.readlines())
    print(f"training path ({len(TRAINING_PATH)} files): {path_lines} lines")


if __name__ == '__main__':
    main()
