"""Packing: a packed batch's loss equals the token-weighted sum of per-document losses."""
import warnings

import pytest
import torch

from megatron_jinpan.config import load_config
from megatron_jinpan.data import build_train_data
from megatron_jinpan.data.datasets import Sample, collate
from megatron_jinpan.models import KernelChoice, Llama, causal_lm_loss, get_model_config, init_weights

warnings.filterwarnings("ignore")


def _model(attention):
    torch.manual_seed(0)
    cfg = get_model_config("debug")
    model = init_weights(Llama(cfg), seed=0).eval()
    return model.set_kernels(KernelChoice(attention=attention, norm="torch", rope="torch", swiglu="torch")), cfg


def _doc_loss_sum(model, doc):
    """Sum of next-token losses of one document run alone (len(doc)-1 predictions)."""
    x = torch.tensor(doc[:-1])[None]
    y = torch.tensor(doc[1:])[None]
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits[0].float(), y[0], reduction="sum"), len(doc) - 1


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_per_document_losses(attention):
    model, mcfg = _model(attention)
    g = torch.Generator().manual_seed(1)
    seq = 24
    # two rows; row 0 holds three whole documents, row 1 two (the last one's final token is the extra label)
    rows = [[7, 9, 9], [10, 15]]
    samples, docs = [], []
    for lengths in rows:
        pieces = [torch.randint(3, mcfg.vocab_size, (n,), generator=g) for n in lengths]
        text = torch.cat(pieces)
        assert len(text) == seq + 1
        samples.append(Sample(text.numpy(), [len(p) for p in pieces]))
        docs.extend(p.tolist() for p in pieces)
    batch = collate(samples, seq, pack=True)
    assert batch["cu_seqlens"].tolist() == [0, 7, 16, 24, 34, 48]
    with torch.no_grad():
        logits = model(batch["tokens"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
        packed = causal_lm_loss(logits, batch["labels"], batch["loss_mask"])
        total, count = 0.0, 0
        for i, doc in enumerate(docs):
            # the last document of each row ends with the extra label token: it predicts it too
            loss, n = _doc_loss_sum(model, doc)
            total, count = total + loss, count + n
    assert int(batch["loss_mask"].sum()) == count
    torch.testing.assert_close(packed, total / count, rtol=1e-5, atol=1e-6)
    # without document masking the same batch gives a different loss
    with torch.no_grad():
        unmasked = causal_lm_loss(model(batch["tokens"]), batch["labels"], batch["loss_mask"])
    assert not torch.allclose(unmasked, packed)


def test_packed_real_batch_matches_documents():
    """Mock packed micro-batches through the model: per-segment runs reproduce the packed logits."""
    model, mcfg = _model("sdpa")
    cfg = load_config(None, ["data.mock=true", "data.pack=true", "train.global_batch=2", "train.micro_batch=2",
                             "train.seq_len=48", f"model.vocab_size={mcfg.vocab_size}"])
    mb = build_train_data(cfg).microbatches(0)[0]
    with torch.no_grad():
        logits = model(mb["tokens"], position_ids=mb["position_ids"], cu_seqlens=mb["cu_seqlens"])
        flat_tokens, flat_logits = mb["tokens"].reshape(-1), logits.reshape(-1, logits.shape[-1])
        cu = mb["cu_seqlens"].tolist()
        assert len(cu) > 3
        for s, e in zip(cu[:-1], cu[1:]):
            alone = model(flat_tokens[s:e][None])[0]
            torch.testing.assert_close(flat_logits[s:e], alone, rtol=1e-4, atol=1e-5)
