"""The models of both families.

megatron-core warns when first imported about optional packages this project does not use (Apex,
Transformer Engine; see ``pretrain.runtime.quiet``). The filters go in here, before any module of
this package imports it: a sampler or the chat reaches megatron-core through the models before the
runtime starts, and the runtime's own call would come too late for them.
"""

from ..runtime.quiet import silence_known_warnings

silence_known_warnings()
