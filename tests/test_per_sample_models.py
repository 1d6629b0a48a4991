"""Real model code, unmodified: per-sample gradients, norms and clipped sums against
the per-sample loop in float64 (Hugging Face models from tiny configs, random init,
padded batches; a nanoGPT-style GPT)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchgrad as bg
from tests.test_per_sample_rules import loop_grads, rel_err


def assert_close(actual, expected):
    """Relative error ≤ 1e-10 per parameter; a parameter whose gradient is 0 in exact
    arithmetic (a key bias before softmax) is compared at 1e-13 of the whole gradient."""
    whole = sum(float(e.norm()) for e in expected.values())
    for key, e in expected.items():
        assert float((actual[key] - e).norm()) <= 1e-10 * float(e.norm()) + 1e-13 * whole, key


def lm_loss(model, batch):
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    return bg.Loss.from_causal_lm(logits, labels)


def mlm_loss(model, batch):
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    return bg.Loss.from_criterion(
        nn.CrossEntropyLoss(ignore_index=-100), logits.flatten(0, 1), labels.flatten()
    )


def padded_batch(vocab, rows=3, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, 3:] = 0  # right padding
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def hf(name):
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=11, attn_implementation="eager")
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=1,
            n_embd=8,
            n_head=2,
            n_positions=8,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **small,
        )
        return transformers.GPT2LMHeadModel(config), lm_loss
    if name == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=1,
            hidden_size=8,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=8,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **small,
        )
        return transformers.BertForMaskedLM(config), mlm_loss
    config = transformers.LlamaConfig(
        num_hidden_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        max_position_embeddings=8,
        **small,
    )
    return transformers.LlamaForCausalLM(config), lm_loss


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hugging_face_models_as_shipped(name):
    torch.manual_seed(0)
    model, loss_fn = hf(name)
    model = model.double().train()
    batch = padded_batch(11)
    reference = loop_grads(model, loss_fn, batch, 3)

    grads = bg.per_sample_grads(model, loss_fn, batch)
    norms = bg.per_sample_norms(model, loss_fn, batch)

    assert grads.keys() == reference.keys()
    assert_close(grads, reference)
    flat = torch.cat([r.flatten(1) for r in reference.values()], 1)
    assert rel_err(norms, flat.norm(dim=1)) <= 1e-10
    clip = float(flat.norm(dim=1).median())
    factors = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    model.zero_grad(set_to_none=True)
    bg.accumulate(model, loss_fn, batch, reduction="sum", clip_per_sample=clip)
    expected = {k: torch.einsum("b,b...->...", factors, r) for k, r in reference.items()}
    assert_close({k: p.grad for k, p in model.named_parameters()}, expected)


def test_gpt2_projections_use_the_conv1d_rule_not_vmap():
    """Hugging Face's Conv1D flattens the samples with the positions; a built-in rule
    reads it as a linear layer, exact like the layer rules (no sums compared)."""
    from batchgrad._per_sample_guard import sum_checked
    from batchgrad._per_sample_modules import KnownModule
    from batchgrad._per_sample_plan import trace
    from batchgrad._per_sample_vmap import VmapModule

    torch.manual_seed(0)
    model, loss_fn = hf("gpt2")
    traced, units = trace(model.double(), loss_fn, padded_batch(11), 0)
    conv1d = [u for u in units if type(getattr(u.site, "module", None)).__name__ == "Conv1D"]
    assert len(conv1d) == 4
    assert all(isinstance(u, KnownModule) for u in conv1d)
    assert not any(isinstance(u, VmapModule) for u in units)
    assert sum_checked(traced, units, list(model.parameters())) == []


def test_gpt2_norms_and_clipping_form_no_conv1d_per_sample_gradients(monkeypatch):
    """Conv1D's norms come from ghost norms and its clipped sum from one weighted
    product, as nn.Linear's: its per-sample gradients are never formed for them."""
    from batchgrad._per_sample_modules import TransformersConv1D

    torch.manual_seed(0)
    model, loss_fn = hf("gpt2")
    model = model.double()
    batch = padded_batch(11)
    reference = loop_grads(model, loss_fn, batch, 3)

    def refuse(self):
        raise AssertionError("Conv1D per-sample gradients formed")

    monkeypatch.setattr(TransformersConv1D, "grads", refuse)
    flat = torch.cat([r.flatten(1) for r in reference.values()], 1).norm(dim=1)
    assert rel_err(bg.per_sample_norms(model, loss_fn, batch, verify=True), flat) <= 1e-10
    clip = float(flat.median())
    factors = (clip / (flat + 1e-6)).clamp(max=1.0)
    model.zero_grad(set_to_none=True)
    bg.accumulate(model, loss_fn, batch, reduction="sum", clip_per_sample=clip)
    expected = {k: torch.einsum("b,b...->...", factors, r) for k, r in reference.items()}
    assert_close({k: p.grad for k, p in model.named_parameters()}, expected)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused c_attn, a causal mask, SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.heads = heads

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class GPT(nn.Module):
    """nanoGPT-style: positions ``arange(T)`` shared by all samples, tied lm_head."""

    def __init__(self, vocab=9, width=8, heads=2, block=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.ln_1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize(("rows", "micro_batch_size"), [(4, None), (6, 4), (5, 2)])
def test_nanogpt_style_gpt_with_coinciding_sizes(rows, micro_batch_size):
    """T = 4 equals B, or the micro-batch size: positions must not be taken for samples."""
    torch.manual_seed(0)
    model = GPT().double()
    ids = torch.randint(0, 9, (rows, 4))

    def loss_fn(model, batch):
        return bg.Loss.from_causal_lm(model(batch), batch)

    reference = loop_grads(model, loss_fn, ids, rows)
    grads = bg.per_sample_grads(model, loss_fn, ids, micro_batch_size=micro_batch_size)
    norms = bg.per_sample_norms(model, loss_fn, ids, micro_batch_size=micro_batch_size)
    assert_close(grads, reference)
    flat = torch.cat([r.flatten(1) for r in reference.values()], 1)
    assert rel_err(norms, flat.norm(dim=1)) <= 1e-10
