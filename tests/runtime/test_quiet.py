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


def test_the_tensor_parallel_stream_advice_is_dropped_only_without_a_gpu(monkeypatch):
    """megatron-core's CUDA_DEVICE_MAX_CONNECTIONS advice printed once per rank of every CPU run at
    tensor parallel 2; on a GPU it is worth reading and stays."""
    import warnings

    import torch

    from pretrain.runtime.quiet import silence_known_warnings

    advice = ("When using async grad allreduce it is recommended to set the environment variable "
              "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup")
    for gpu, shown in ((False, []), (True, [advice])):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            silence_known_warnings()
            warnings.warn(advice, UserWarning)
        assert [str(w.message) for w in caught] == shown


def test_reading_a_recipe_imports_no_torch():
    """The filters go in when pretrain.model is imported, which pretrain.recipe does (for ConfigError):
    they must not bring torch, or a CUDA probe, into a process that only reads YAML."""
    code = "import sys, pretrain.recipe, pretrain.typed_yaml; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
