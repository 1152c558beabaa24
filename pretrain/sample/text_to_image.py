"""Text-to-image sampling: Euler integration of the rectified flow with classifier-free guidance.

Time convention as in training: t = 0 is noise, t = 1 is data. With N uniform steps, dt = 1/N and
step k feeds t = k/N (float32 all the way to the sinusoid: never rounded to bf16); the
``logit_normal`` schedule places the steps at the quantiles of the training's time distribution
(``time_grid``). Guidance: v = w * v_cond - (w - 1) * v_uncond, the same w at every step before
``guidance_until`` and w = 1 (conditional only) from there on (default 1.0: guided all the way).

Each prompt becomes one conditional document ``[BOS, prompt..., GEN_TIME, GEN_LATENT x N]`` and, with
guidance, one unconditional document: the same tokens with the prompt after BOS hidden from
attention, positions kept (``pretrain.step.hide_dropped_prompts``: exactly the training drop and
the released sampler's mask). The prompt prefix does not depend on z or t, so it runs once and its
keys/values are cached; each step only runs the time token and the latent tokens, at positions that
continue the prefix. ``use_cache=False`` recomputes whole documents every step (the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from datacontract.format import TokenKind
from fused_kernels import cfg_euler_step
from ..model.janusflow import ModelInputs
from ..step import hide_dropped_prompts
from .cache import KVCache, attach_kv_cache

# The generation prompt of ``data_tools/documents.py`` (what the model was trained on): BOS, then
# this text, then the time slot (where the released sampler's begin-of-generation marker sits).
GENERATION_TEMPLATE = "User: {prompt}\n\nAssistant:"

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def generation_prompt_ids(tokenizer, prompt: str, bos_id: int) -> list[int]:
    """BOS + the tokenized template: the prefix before the time token."""
    text = GENERATION_TEMPLATE.format(prompt=prompt)
    return [int(bos_id)] + list(tokenizer.encode(text, add_special_tokens=False))


def time_grid(steps: int, schedule: str = "uniform", time_mean: float = 0.0,
              time_std: float = 1.0) -> list[tuple[float, float]]:
    """The (t, dt) of each Euler step from t = 0 to 1 (``steps`` >= 1).

    ``uniform``: t = k/steps, dt = 1/steps. ``logit_normal``: the step boundaries are the quantiles
    k/steps of the training's time distribution (logit-normal with the recipe's ``loss.rf_time_mean``
    and ``loss.rf_time_std``, ``pretrain.losses``), so every step covers the same share of the times
    the velocity was trained on: small steps where training was dense, and (with the default (0, 1))
    a last step that jumps from t = sigmoid(Phi^-1(1 - 1/steps)) straight to the data (at 30 steps
    from 0.86: Euler's last step is then the x-prediction from a well-trained time instead of a crawl
    through the rarely trained end of the path).
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one Euler step")
    if schedule == "uniform":
        return [(k / steps, 1.0 / steps) for k in range(steps)]
    if schedule != "logit_normal":
        raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    normal = NormalDist(time_mean, time_std)
    bounds = [0.0] + [1.0 / (1.0 + math.exp(-normal.inv_cdf(k / steps))) for k in range(1, steps)] + [1.0]
    return [(t, t_next - t) for t, t_next in zip(bounds[:-1], bounds[1:])]


SCHEDULES = ("uniform", "logit_normal")


def euler_integrate(velocity: VelocityFn, z0: torch.Tensor, steps: int, schedule: str = "uniform",
                    time_mean: float = 0.0, time_std: float = 1.0) -> torch.Tensor:
    """Integrate dz/dt = velocity(z, t) from t = 0 to 1 in ``steps`` Euler steps (float32) at the
    times of ``time_grid(steps, schedule, time_mean, time_std)``.

    ``velocity(z, t)`` gets the current z (float32) and t as a Python float (k/steps when uniform). A
    velocity with an ``euler_step(z, t, dt)`` method (:class:`PromptVelocity`) makes the whole update
    itself (guidance and step fused: ``fused_kernels.cfg_euler_step``).
    """
    grid = time_grid(steps, schedule, time_mean, time_std)
    euler_step = getattr(velocity, "euler_step", None) or (lambda z, t, dt: z + velocity(z, t).float() * dt)
    z = z0.float()
    for t, dt in grid:
        z = euler_step(z, t, dt)
    return z


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance: w * v_cond - (w - 1) * v_uncond."""
    return weight * v_cond - (weight - 1.0) * v_uncond


@dataclass
class GenerationLayout:
    """Whole generation documents of a batch of prompts, packed: conditional rows, then (with
    guidance) the unconditional rows in the same order. All tensors [T] except cu_seqlens [D+1] and
    prefix_lengths [D]; ``is_prefix`` marks the prompt tokens (everything before the time token)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    token_kind: torch.Tensor
    cu_seqlens: torch.Tensor
    hidden_keys: Optional[torch.Tensor]
    is_prefix: torch.Tensor
    prefix_lengths: torch.Tensor
    num_latent_tokens: int

    @property
    def num_docs(self) -> int:
        return len(self.prefix_lengths)

    def to(self, device) -> "GenerationLayout":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return GenerationLayout(**moved)

    def _suffix_cu(self) -> torch.Tensor:
        per_doc = torch.full((self.num_docs,), 1 + self.num_latent_tokens, dtype=torch.int32)
        return torch.nn.functional.pad(torch.cumsum(per_doc, 0), (1, 0)).to(torch.int32).to(self.cu_seqlens.device)

    def full_inputs(self, z: torch.Tensor, t: torch.Tensor) -> ModelInputs:
        """Whole documents (no cache); z [D, C, S, S], t [D]."""
        return ModelInputs(
            input_ids=self.input_ids, position_ids=self.position_ids, cu_seqlens=self.cu_seqlens,
            token_kind=self.token_kind, hidden_keys=self.hidden_keys, gen_z_t=z, gen_t=t,
        )

    def prefix_inputs(self) -> ModelInputs:
        """The prompt tokens only (to record the cache)."""
        keep = self.is_prefix
        cu = torch.nn.functional.pad(torch.cumsum(self.prefix_lengths, 0), (1, 0)).to(torch.int32)
        return ModelInputs(
            input_ids=self.input_ids[keep], position_ids=self.position_ids[keep],
            cu_seqlens=cu.to(self.cu_seqlens.device), token_kind=self.token_kind[keep],
            hidden_keys=None if self.hidden_keys is None else self.hidden_keys[keep],
        )

    def step_inputs(self, z: torch.Tensor, t: torch.Tensor) -> ModelInputs:
        """The time and latent tokens only, positions continuing each prefix (with the cache)."""
        keep = ~self.is_prefix
        return ModelInputs(
            input_ids=self.input_ids[keep], position_ids=self.position_ids[keep],
            cu_seqlens=self._suffix_cu(), token_kind=self.token_kind[keep], gen_z_t=z, gen_t=t,
        )


def build_generation_layout(
    prompts: Sequence[Sequence[int]], num_latent_tokens: int, with_uncond: bool
) -> GenerationLayout:
    """Documents ``[prompt, GEN_TIME, GEN_LATENT x N]`` (each prompt starts with BOS), conditional
    rows first, then one unconditional row per prompt when ``with_uncond``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least its BOS token")
    rows = list(prompts) * (2 if with_uncond else 1)
    ids, kinds, positions, lengths = [], [], [], []
    for prompt in rows:
        n = len(prompt)
        ids += list(prompt) + [0] * (1 + num_latent_tokens)  # image slots: ids unused (embeddings replaced)
        kinds += [TokenKind.TEXT] * n + [TokenKind.GEN_TIME] + [TokenKind.GEN_LATENT] * num_latent_tokens
        positions += range(n + 1 + num_latent_tokens)
        lengths.append(n + 1 + num_latent_tokens)
    token_kind = torch.tensor([int(k) for k in kinds], dtype=torch.long)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(torch.tensor(lengths), 0), (1, 0)).to(torch.int32)
    hidden = None
    if with_uncond:
        dropped = torch.tensor([False] * len(prompts) + [True] * len(prompts))
        hidden = hide_dropped_prompts(token_kind, cu_seqlens, dropped)
    prefix_lengths = torch.tensor([len(p) for p in rows], dtype=torch.long)
    doc = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
    position_ids = torch.tensor(list(positions), dtype=torch.long)
    return GenerationLayout(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=position_ids,
        token_kind=token_kind,
        cu_seqlens=cu_seqlens,
        hidden_keys=hidden,
        is_prefix=position_ids < prefix_lengths[doc],
        prefix_lengths=prefix_lengths,
        num_latent_tokens=num_latent_tokens,
    )


class PromptVelocity:
    """v(z, t) of the model for a batch of prompts, guided, with the prompt prefix cached.

    Construction runs the prefix once (``use_cache``). Calling with z [B, C, S, S] (B prompts) and a
    float t returns the guided velocity [B, C, S, S] in float32. ``on_velocity(t, v_rows)``, if given,
    sees the pre-guidance velocities of all rows (conditional rows, then unconditional).
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        cfg_weight: float = 2.0,
        use_cache: bool = True,
        on_velocity: Optional[Callable[[float, torch.Tensor], None]] = None,
        guidance_until: float = 1.0,
    ) -> None:
        self.model = model
        self.cfg_weight = float(cfg_weight)
        self.guidance_until = float(guidance_until)
        self.guided = self.cfg_weight != 1.0  # w = 1 is the conditional branch alone: skip the other
        self.num_prompts = len(prompts)
        self.device = next(model.parameters()).device
        n_latent = model.cfg.gen_vision.num_latent_tokens
        self.layout = build_generation_layout(prompts, n_latent, self.guided).to(self.device)
        self.on_velocity = on_velocity
        self.cache: Optional[KVCache] = None
        if use_cache:
            self.cache = KVCache()
            with torch.no_grad(), attach_kv_cache(model, self.cache):
                model(self.layout.prefix_inputs())
            self.cache.freeze()

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, t: float) -> torch.Tensor:
        v = self._velocities(z, t)
        if not self.guided:
            return v
        v_cond, v_uncond = v.chunk(2)
        return guided_velocity(v_cond, v_uncond, self.weight_at(t))

    def weight_at(self, t: float) -> float:
        """The guidance weight at time t: ``cfg_weight`` before ``guidance_until``, 1 (the conditional
        velocity alone) from there on. Guidance shapes the image while its layout forms; near the
        data it only multiplies the two branches' disagreement about the remaining noise (w * e_c -
        (w - 1) * e_u), which shows as per-pixel noise."""
        return self.cfg_weight if t < self.guidance_until else 1.0

    @torch.no_grad()
    def euler_step(self, z: torch.Tensor, t: float, dt: float) -> torch.Tensor:
        """``z + dt * v(z, t)`` (float32, z on the model's device): guidance and step in one pass."""
        v = self._velocities(z, t)
        v_cond, v_uncond = v.chunk(2) if self.guided else (v, v)
        return cfg_euler_step(z.to(self.device, torch.float32), v_cond, v_uncond, self.weight_at(t), dt)

    def _velocities(self, z: torch.Tensor, t: float) -> torch.Tensor:
        """The model's velocities of all rows (conditional, then unconditional), float32."""
        if z.shape[0] != self.num_prompts:
            raise ValueError(f"z has {z.shape[0]} rows for {self.num_prompts} prompts")
        rows = z.to(self.device, torch.float32)
        if self.guided:
            rows = torch.cat([rows, rows])
        t_rows = torch.full((len(rows),), t, dtype=torch.float32, device=self.device)
        if self.cache is None:
            _, outputs = self.model(self.layout.full_inputs(rows, t_rows))
        else:
            with attach_kv_cache(self.model, self.cache):
                _, outputs = self.model(self.layout.step_inputs(rows, t_rows))
        v = outputs.velocity.float()
        if self.on_velocity is not None:
            self.on_velocity(t, v)
        return v


def initial_noise(model: nn.Module, num: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """z0 ~ N(0, I) [num, C, S, S] float32, drawn on the CPU (the same numbers on any device)."""
    g = model.cfg.gen_vision
    return torch.randn(num, g.latent_channels, g.latent_size, g.latent_size, generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    steps: int = 30,
    cfg_weight: float = 2.0,
    z0: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    on_velocity: Optional[Callable[[float, torch.Tensor], None]] = None,
    schedule: str = "uniform",
    guidance_until: float = 1.0,
    time_mean: float = 0.0,
    time_std: float = 1.0,
) -> torch.Tensor:
    """Latents [B, C, S, S] (float32, in the flow's scaled latent space) for B tokenized prompts.

    ``schedule``, ``time_mean``, ``time_std``: the Euler steps' times (``time_grid``; the last two are
    the training's logit-normal, used by the ``logit_normal`` schedule); ``guidance_until``: the time
    from which guidance stops (``PromptVelocity.weight_at``; 1.0: guided all the way).

    ``prompts``: token ids, each starting with BOS (``generation_prompt_ids``). ``z0``: the starting
    noise, else drawn from ``generator``. The model must be a whole single-stage ``JanusFlowModel``
    in eval mode.
    """
    if z0 is None:
        z0 = initial_noise(model, len(prompts), generator)
    velocity = PromptVelocity(model, prompts, cfg_weight, use_cache, on_velocity, guidance_until)
    return euler_integrate(velocity, z0.to(velocity.device), steps, schedule, time_mean, time_std)
