"""Running the gemma3 command in-process."""


def run_cli(args, capsys):
    """Runs the gemma3 CLI in-process; returns (exit code, stdout, stderr)."""
    from gemma3.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, out, err, *needles):
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma3: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
