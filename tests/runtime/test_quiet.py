"""The known third-party start-up warnings stay off the console on every way into megatron-core,
not only through the runtime (the samplers and the chat import the models first)."""

import subprocess
import sys

from tests.launch_helpers import REPO, child_env


def test_importing_the_models_first_prints_no_known_warning():
    # Before: "UserWarning: Apex is not installed. Falling back to Torch Norm" from megatron-core's
    # layer specs, printed by pretrain.chat and by a Janus-Pro export.
    code = "import pretrain.chat, pretrain.sample.januspro, pretrain.model.januspro, pretrain.model.janusflow"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr[-2000:]
