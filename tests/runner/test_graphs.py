"""The pieces of the CUDA-graphed training step that do not need a GPU: the fused forwards and the
padding to a bucket give the same logits and gradients as the plain model (fp32, CPU)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from runner.train.graphs import bucket_of, fuse_kernels, pad_batch
from runner.train.packing import pack
from runner.train.recipe import trainable_parameters
from tests.runner.train_helpers import examples, lora_model, synthetic


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs()).logits[0]
    loss = F.cross_entropy(logits, batch.targets)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model)}


def test_fused_forwards_give_the_plain_models_logits_and_gradients(
    tiny_model_dir, tokenizer
) -> None:
    batch = pack(examples(tokenizer, synthetic(1)[:4]))
    plain = lora_model(tiny_model_dir)
    fused = copy.deepcopy(plain)
    counts = fuse_kernels(fused)
    layers = plain.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * layers + 1, "lora": 7 * layers}
    want_logits, want_grads = _loss_and_grads(plain, batch)
    got_logits, got_grads = _loss_and_grads(fused, batch)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 14 * layers
    for name, want in want_grads.items():
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_a_step_padded_to_its_bucket_gives_the_same_answer_logits(
    tiny_model_dir, tokenizer
) -> None:
    model = lora_model(tiny_model_dir)
    model.eval()
    batch = pack(examples(tokenizer, synthetic(1)[:3]))
    size = bucket_of(batch.tokens)
    assert size > batch.tokens  # there is padding to get wrong
    # Two spare boundary slots: a padding sequence and an empty one, as a short last step has.
    ids, positions, cu = pad_batch(batch, size, slots=batch.cu_seqlens.numel() + 2)
    assert cu.tolist()[-2:] == [size, size]
    with torch.no_grad():
        want = model(**batch.model_inputs()).logits[0]
        got = model(
            input_ids=ids,
            position_ids=positions,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=size,
            max_length_k=size,
            use_cache=False,
        ).logits[0, batch.logit_positions]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
