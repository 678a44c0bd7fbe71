"""LibraGrad (Mehri et al., CVPR 2025): the ``libragrad`` option of the gradient methods.

* **The authors' code.** ``tests/libragrad_reference.py`` runs the authors' timm fork
  (``NightMachinery/pytorch-image-models-libragrad-v1``, gradient brand ``LX1``) in a process of
  its own on the weights of tiny random timm ViTs (class token; mean-pooled with registers; no
  embedded class token, no q, k, v biases), float64; attnx's gradient × input, the
  gradients at the attention probabilities and at the blocks' tokens, and AttCAT, generic and
  attention GradCAM computed from the fork's gradients must equal attnx's with ``libragrad=True``
  to ≤ 1e-10. The fork lives outside the repository (``ATTNX_LIBRAGRAD_FORK``, default
  ``/work/ref/NightMachinery+pytorch-image-models-libragrad-v1``): the test skips without it.
* **Completeness.** With the constants of a model zeroed (biases, LayerNorm shifts, class /
  distillation / register tokens, position and token-type embeddings), LibraGrad's gradient ×
  input sums to the explained logit, on ViTs (timm, torchvision, Hugging Face), BERT, GPT-2, Llama
  (RMSNorm, the gated MLP) and the CLIP image towers, float64, to ≤ 1e-9 relative; the plain gradient does not.
* **The rules written out** on the ops of decoders and encoders the fork has no model for
  (RMSNorm, SiLU gates, SDPA): the gradient of a hand-written forward with LibraGrad's detaches.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnx
from attnx import Needs
from attnx.lrp import LRPEngine, get_preset

TESTS = Path(__file__).resolve().parent
FORK = Path(os.environ.get("ATTNX_LIBRAGRAD_FORK", "/work/ref/NightMachinery+pytorch-image-models-libragrad-v1"))
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> float:
    """The largest difference relative to the largest reference value; asserted ≤ ``tol``."""
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))
    assert err <= tol, err
    return err


# the authors' fork ------------------------------------------------------------------------------
#: the heads the fork is run with: class token; mean-pooled with register tokens; class token
#: without position embedding and without q, k, v biases
HEADS = {
    "class_token": {},
    "pooled_registers": dict(class_token=False, global_pool="avg", reg_tokens=4),
    "no_embed_class": dict(no_embed_class=True, qkv_bias=False),
}


@pytest.fixture(scope="module", params=list(HEADS))
def fork_run(request, tmp_path_factory):
    if not (FORK / "timm" / "night" / "decomposition.py").exists():
        pytest.skip(f"the LibraGrad authors' timm fork is not at {FORK} (set ATTNX_LIBRAGRAD_FORK)")
    from timm.models.vision_transformer import VisionTransformer

    folder = tmp_path_factory.mktemp("libragrad")
    spec = {**VIT, **HEADS[request.param]}
    torch.manual_seed(0)
    model = VisionTransformer(**spec).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.save(model.state_dict(), folder / "state.pt")
    torch.save(x, folder / "state_x.pt")
    (folder / "args.json").write_text(json.dumps({"model": spec}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(TESTS / "libragrad_reference.py"), str(FORK), str(folder / "state.pt"),
                    str(folder / "args.json"), str(folder / "out.pt")], check=True, env=env, cwd=folder, timeout=280)
    return model, x, torch.load(folder / "out.pt"), request.param


@pytest.mark.subprocess
def test_gradient_x_input_is_the_forks(fork_run):
    model, x, ref, _ = fork_run
    e = attnx.explain(model, x, method="gradient_x_input", libragrad=True)
    close(e.input_relevance, ref["gradient_x_input"])
    plain = attnx.explain(model, x, method="gradient_x_input").input_relevance
    assert float((plain - ref["gradient_x_input"]).abs().max()) > 1e-3  # LibraGrad changes the gradient


@pytest.mark.subprocess
def test_recorded_gradients_are_the_forks(fork_run):
    """``∂y_t/∂A`` and ``∂y_t/∂h^l`` of every block, under LibraGrad's backward."""
    model, x, ref, _ = fork_run
    trace = attnx.Explainer(model).trace(x, None, Needs(attentions=True, gradients=True, hidden_states=True),
                                         preset=get_preset("libragrad"))
    for layer in range(VIT["depth"]):
        close(trace.attentions[layer], ref["attentions"][layer])
        close(trace.gradients[layer], ref["attention_gradients"][layer])
        close(trace.hidden_states[layer], ref["block_inputs"][layer])
        close(trace.hidden_gradients[layer], ref["block_gradients"][layer])


@pytest.mark.subprocess
def test_methods_on_the_forks_gradients(fork_run):
    """AttCAT, generic (GenAtt) and attention GradCAM with ``libragrad=True``, against their
    equations evaluated on the fork's attentions and gradients (generic and GradCAM at the class
    token's row, for the heads that read it)."""
    model, x, ref, head = fork_run
    A, G, H, HG = ref["attentions"], ref["attention_gradients"], ref["block_inputs"], ref["block_gradients"]
    prefix = model.num_prefix_tokens
    attcat = sum((h * g).sum(-1) * a.mean(1).mean(1) for h, g, a in zip(H, HG, A))
    close(attnx.explain(model, x, method="attcat", libragrad=True).scores, attcat[:, prefix:])
    if head == "pooled_registers":
        return
    R = torch.eye(A[0].shape[-1], dtype=torch.float64).expand(2, -1, -1)
    for a, g in zip(A, G):
        R = R + (g * a).clamp(min=0).mean(1) @ R
    close(attnx.explain(model, x, method="generic", libragrad=True).scores, R[:, 0, 1:])
    w = G[-1][:, :, 0, 1:].mean(-1, keepdim=True)
    cam = (w * A[-1][:, :, 0, 1:]).mean(1).clamp(min=0)
    close(attnx.explain(model, x, method="attn_gradcam", libragrad=True).scores, cam)


# completeness -----------------------------------------------------------------------------------
def zero_constants(model: nn.Module) -> nn.Module:
    """Every parameter zeroed but the weights of linear layers (``nn.MultiheadAttention``'s input
    projection and OpenCLIP's image projection too), convolutions, normalisations and the token
    embeddings (whose output is the explained input)."""
    embeddings = attnx.Explainer(model).adapter.input_embeddings()
    keep = set()
    for m in model.modules():
        kind = type(m).__name__
        if isinstance(m, (nn.Linear, nn.Conv2d)) or kind == "Conv1D" or "Norm" in kind or m is embeddings:
            if getattr(m, "weight", None) is not None:
                keep.add(id(m.weight))
        if isinstance(m, nn.MultiheadAttention):
            keep.add(id(m.in_proj_weight))
    keep |= {id(p) for name, p in model.named_parameters() if name.endswith("visual.proj")}  # OpenCLIP's projection
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in keep:
                p.zero_()
    return model


def _cases():
    sys.path.insert(0, str(TESTS))
    import conftest as C
    import decoder_models as D

    image = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for name in ("timm_vit", "timm_deit_distilled", "timm_avgpool_reg4", "torchvision_vit", "hf_vit_eager", "hf_vit_sdpa",
                 "hf_bert_eager", "hf_bert_sdpa"):
        case = C.CASES[name]
        x = C.text_inputs(2, torch.Generator().manual_seed(0), case.pad_token_id) if case.is_text else image
        yield pytest.param(case.build, x, id=name)
    for dc in (D.DecoderCase("gpt2", "lm", "eager"), D.DecoderCase("llama", "lm", "eager"), D.DecoderCase("llama", "cls", "sdpa")):
        yield pytest.param(dc.model, dc.inputs(), id=dc.name)
    import clip_models as CM

    for name, build in (("hf_clip", CM.hf_clip), ("open_clip", CM.open_clip_model)):
        yield pytest.param(build, CM.images(2, dtype=torch.float64), id=f"{name}_image_tower")


def first_dimension(output):
    """A dual encoder's explained score: the first dimension of its image embedding."""
    return (output if torch.is_tensor(output) else output.image_embeds)[:, 0]


@pytest.mark.parametrize("build, x", list(_cases()))
def test_gradient_x_input_is_complete(build, x, request):
    model = zero_constants(build().double().eval())
    target = first_dimension if "clip" in request.node.callspec.id else None
    e = attnx.explain(model, x, method="gradient_x_input", libragrad=True, target=target)
    total = e.input_relevance.flatten(1).sum(1)
    close(total, e.target_scores.to(total), 1e-9)
    plain = attnx.explain(model, x, method="gradient_x_input", target=target).input_relevance.flatten(1).sum(1)
    assert float((plain - e.target_scores.to(total)).abs().max()) > 1e-3 * float(e.target_scores.abs().max())


# the rules written out ----------------------------------------------------------------------------
class Block(nn.Module):
    """The ops of encoders and decoders: LayerNorm, attention (SDPA or written out), RMSNorm, a
    SiLU-gated MLP, a GELU MLP, a mean-pooled head."""

    def __init__(self, sdpa: bool, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.sdpa, self.heads = sdpa, heads
        self.ln, self.rms = nn.LayerNorm(d), nn.RMSNorm(d, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.fc, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, 3)

    def split(self, t):
        B, N, D = t.shape
        return t.view(B, N, self.heads, D // self.heads).transpose(1, 2)

    def attention(self, q, k, v):
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v

    def forward(self, x):
        h = self.ln(x)
        a = self.attention(self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).flatten(2))
        h = self.rms(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(F.gelu(self.fc(x)).mean(1))


def libragrad_written_out(m: Block, x: torch.Tensor) -> torch.Tensor:
    """``m``'s forward with LibraGrad's backward written out (Mehri et al.; the authors' ``LX1``
    brand and ``DU`` gates): σ of LayerNorm and the RMS detached, Q and K detached, the gates of
    SiLU and GELU detached, the gated product's gradient halved on each factor."""
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True).detach()
    h = (x - mu) / torch.sqrt(var + m.ln.eps) * m.ln.weight + m.ln.bias
    q, k, v = m.split(m.q(h)).detach(), m.split(m.k(h)).detach(), m.split(m.v(h))
    a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    x = x + m.o(a.transpose(1, 2).flatten(2))
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).detach() + m.rms.eps) * m.rms.weight
    g = m.gate(h)
    z = g * torch.sigmoid(g).detach() * m.up(h)
    z = z.detach() + (z / 2 - (z / 2).detach())  # 1/N on a product of N = 2 factors
    x = x + m.down(z)
    f = m.fc(x)
    return m.head((f * (0.5 * (1 + torch.erf(f / 2 ** 0.5))).detach()).mean(1))


@pytest.mark.parametrize("sdpa", [False, True], ids=["written-out", "sdpa"])
def test_rules_are_libragrads_backward_written_out(sdpa):
    torch.manual_seed(0)
    m = Block(sdpa).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    y_ref = libragrad_written_out(m, xr)
    (g_ref,) = torch.autograd.grad(y_ref[:, 1].sum(), xr)
    with LRPEngine(m, "libragrad") as engine:
        xt = engine.track(x)
        y = m(xt)
    engine.check_coverage()
    (g,) = torch.autograd.grad(y[:, 1].sum(), xt)
    close(y.detach(), y_ref.detach(), 1e-12)  # the forward is the model's
    close(g, g_ref)


def test_integrated_gradients_integrates_libragrads_gradient():
    """IG with ``libragrad=True`` is ``x ⊙ Σ_k w_k g̃(α_k x)`` (zero baseline, Gauss-Legendre
    points as captum's), ``g̃`` LibraGrad's gradient by the engine on each scaled input."""
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**VIT).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    e = attnx.explain(model, x, method="integrated_gradients", libragrad=True, n_steps=5)
    nodes, weights = np.polynomial.legendre.leggauss(5)
    total = torch.zeros_like(x)
    for node, weight in zip(nodes, weights):
        with LRPEngine(model, "libragrad") as engine:
            xt = engine.track(x * float((node + 1) / 2))
            y = model(xt)
        (g,) = torch.autograd.grad(y.gather(1, e.targets[:, None]).sum(), xt)
        total += float(weight / 2) * g
    close(e.input_relevance, x * total, 1e-7)  # captum rounds the quadrature weights to float32


@pytest.mark.parametrize("method", ["gradient_x_input", "attcat", "generic", "attn_gradcam", "integrated_gradients"])
def test_padded_batch_equals_each_sample_alone_and_model_left_as_found(method):
    sys.path.insert(0, str(TESTS))
    import conftest as C

    case = C.CASES["hf_bert_eager"]
    model = case.build().double().eval()
    x = C.text_inputs(3, torch.Generator().manual_seed(0), case.pad_token_id, [9, 5, 7])
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    options = {"n_steps": 4} if method == "integrated_gradients" else {}
    batched = attnx.explain(model, x, method=method, libragrad=True, **options).scores
    for b in range(3):
        n = int(x["attention_mask"][b].sum())
        alone = attnx.explain(model, {k: v[b:b + 1, :n] for k, v in x.items()}, method=method, libragrad=True, **options)
        close(batched[b, :n], alone.scores[0], 1e-12)
        assert float(batched[b, n:].abs().sum()) == 0.0
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(p.grad is None for p in model.parameters())
