"""Command-line start-up: `--help` and argument errors of the commands answer before torch and diffusers load
(importing them takes seconds), so a typo costs a fraction of a second."""

import subprocess
import sys

import pytest

CODE = ("import sys\nfrom mmf_diffusers.{module} import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('heavy: ' + ','.join(m for m in ('torch', 'diffusers') if m in sys.modules))")


@pytest.mark.parametrize("module, argv", [
    ("hub", ["--help"]),
    ("hub", ["no-such-folder", "user/name"]),
    ("hub", ["some-folder", "user/name", "--token", "x"]),
    ("generate", ["--help"]),
])
def test_help_and_argument_errors_come_before_torch(module, argv, tmp_path):
    result = subprocess.run([sys.executable, "-c", CODE.format(module=module), *argv], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "heavy:", (argv, result.stdout[-500:], result.stderr[-500:])
    assert "usage:" in result.stdout + result.stderr or "error" in result.stderr, result.stderr[-500:]
