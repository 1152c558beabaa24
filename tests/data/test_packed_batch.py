"""collate_packed: flattened documents, positions, boundaries, masks and image tensors."""

import numpy as np
import pytest
import torch

from pretrain.data.batch import PackedRow, PackingMetadata, collate_packed, decode_row, position_ids_for
from datacontract.format import Task, TokenKind
from datacontract.shards import ShardLayout, ShardReader, decode_latent, encode_latent


def _row(lengths, tasks, n_und=0, n_gen=0, latents=False):
    total = sum(lengths)
    img = np.full((8, 8, 3), 255, np.uint8)
    return PackedRow(
        input_ids=np.arange(total, dtype=np.int64), token_kind=np.zeros(total, np.uint8),
        target_mask=np.ones(total, bool), doc_lengths=np.array(lengths), doc_tasks=np.array(tasks),
        und_images=[img] * n_und, gen_images=[np.zeros((8, 8, 3), np.uint8)] * n_gen,
        gen_latents=[np.ones((4, 2, 2), np.float32)] * n_gen if latents else None, resolution=8,
        latent_shape=(4, 2, 2) if latents else None,
    )


def test_positions_and_boundaries_span_rows():
    b = collate_packed([_row([3, 2], [0, 2], n_und=1), _row([4], [1], n_gen=2)])
    assert b.input_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert b.max_seqlen == 4 and b.row_lengths.tolist() == [5, 4]
    assert b.doc_tasks.tolist() == [0, 2, 1]
    assert b.und_pixels.shape == (1, 3, 8, 8) and torch.all(b.und_pixels == 1.0)
    assert b.gen_pixels.shape == (2, 3, 8, 8) and torch.all(b.gen_pixels == -1.0)
    assert b.gen_latents is None and not b.hidden_prompt_mask.any()
    assert b.target_mask.dtype == torch.bool and b.token_kind.dtype == torch.int64


def test_latents_and_empty_image_lists():
    b = collate_packed([_row([5], [1], n_gen=1, latents=True), _row([3], [2], latents=True)])
    assert b.gen_latents.shape == (1, 4, 2, 2)
    b = collate_packed([_row([3], [2], latents=True)])
    assert b.gen_latents.shape == (0, 4, 2, 2) and b.und_pixels.shape == (0, 3, 8, 8)


def test_position_ids_for():
    assert position_ids_for(np.array([2, 1, 3])).tolist() == [0, 1, 0, 0, 1, 2]


def test_latent_bytes_round_trip():
    x = np.random.default_rng(0).normal(size=(4, 3, 3)).astype(np.float32)
    for dtype, tol in (("float16", 1e-3), ("bfloat16", 1e-2)):
        y = decode_latent(encode_latent(x, dtype), dtype, (4, 3, 3))
        assert np.allclose(x, y, rtol=tol, atol=tol)
    bf = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(decode_latent(encode_latent(x, "bfloat16"), "bfloat16", (4, 3, 3)), bf)


def test_decode_row_from_a_real_shard(built):
    import os

    out, manifest = built
    shard = manifest["tasks"]["gen"]["shards"][0]
    reader = ShardReader(os.path.join(out, shard["path"]))
    assert reader.layout == ShardLayout.from_json(manifest["layout"])
    row = decode_row(reader.read_row(0), reader.layout)
    b = collate_packed([row])
    kinds = b.token_kind
    assert (kinds == TokenKind.GEN_TIME).sum() == b.gen_pixels.shape[0] > 0
    assert (kinds == TokenKind.GEN_LATENT).sum() == 4 * b.gen_pixels.shape[0]
    assert b.doc_tasks[0] == Task.GENERATION
    assert b.num_tokens == sum(row.doc_lengths) <= 256


def test_metadata_of_the_slots_counts_and_prompts():
    k = TokenKind
    und = [k.TEXT, k.UND_IMAGE_BEGIN, k.UND_IMAGE, k.UND_IMAGE, k.TEXT]  # doc 0
    gen = [k.TEXT, k.TEXT, k.TEXT, k.GEN_TIME, k.GEN_LATENT, k.GEN_LATENT, k.TEXT]  # doc 1 (prompt 1..2)
    row = _row([5, 7, 3], [0, 1, 2], n_und=1, n_gen=1)
    row.token_kind = np.array(und + gen + [k.TEXT] * 3, np.uint8)
    row.target_mask = np.array([1, 0, 0, 0, 1] + [0] * 7 + [1, 1, 1], bool)  # first tokens flagged too
    b = collate_packed([row])
    m = b.metadata
    assert m.doc_lengths == (5, 7, 3) and m.max_seqlen == 7 and m.num_tokens == 15
    assert m.und_begin_positions.tolist() == [1] and m.und_positions.tolist() == [2, 3]
    assert m.gen_time_positions.tolist() == [8] and m.gen_latent_positions.tolist() == [9, 10]
    assert m.ar_target_positions.tolist() == [4, 13, 14]  # 0 and 12 start their documents
    assert m.num_ar_targets == 3 and m.num_gen == 1 and m.num_und_images == 1 and m.task_docs == (1, 1, 1)
    assert m.prompt_owner.tolist() == [1] * 6 + [0, 0] + [1] * 7  # tokens 6, 7: prompt of gen doc 0
    assert m.ar_target_doc_sizes.tolist() == [1, 2, 2] and m.num_ar_documents == 2
    assert m.gen_start_positions.tolist() == [8] and m.gen_code_positions.numel() == 0
    # The same facts read back from the tensors (what batches without metadata get).
    again = PackingMetadata.from_tensors(b.cu_seqlens, b.token_kind, b.target_mask)
    for name in PackingMetadata.INDEX_FIELDS:
        assert torch.equal(getattr(again, name), getattr(m, name)), name
    # Host-side by design: moving the batch leaves it (and its index tensors) on the CPU.
    moved = b.to("cpu")
    assert moved.metadata is m and m.on("cpu")["gen_time_positions"].device.type == "cpu"


def test_metadata_of_januspro_image_codes():
    """Janus-Pro's generation document: BOS, prompt, <begin_of_image>, codes, <end_of_image>."""
    k = TokenKind
    gen = [k.TEXT, k.TEXT, k.TEXT, k.TEXT, k.GEN_CODE, k.GEN_CODE, k.GEN_CODE, k.TEXT]  # prompt 1..2, boi 3
    und = [k.TEXT, k.TEXT, k.UND_IMAGE, k.UND_IMAGE, k.TEXT, k.TEXT, k.UND_IMAGE, k.UND_IMAGE, k.TEXT]  # two images
    row = _row([8, 9], [1, 0], n_und=2)
    row.token_kind = np.array(gen + und, np.uint8)
    row.target_mask = np.array([0, 0, 0, 0, 1, 1, 1, 0] + [0] * 8 + [1], bool)
    m = collate_packed([row]).metadata
    assert m.num_und_images == 2 and m.und_begin_positions.numel() == 0  # plain <begin_of_image> tokens
    assert m.gen_code_positions.tolist() == [4, 5, 6]
    assert m.gen_start_positions.tolist() == [3] and m.num_gen == 1  # the <begin_of_image> position
    assert m.ar_target_positions.tolist() == [16]  # codes are the image head's, not L_AR's
    assert m.prompt_owner.tolist() == [1, 0, 0] + [1] * 14  # BOS and <begin_of_image> are kept
    assert m.gen_time_positions.numel() == 0


def test_metadata_refuses_two_time_tokens_in_one_document():
    row = _row([4], [1], n_gen=2)
    row.token_kind = np.array([0, TokenKind.GEN_TIME, TokenKind.GEN_TIME, 0], np.uint8)
    with pytest.raises(ValueError, match="more than one generation time token"):
        collate_packed([row])
