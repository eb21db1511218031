"""Curvature of the retain loss for K-FADE: K-FAC, EK-FAC, diagonal and identity estimators Ĝ, the exact
Gauss-Newton product G·v (``ggn``) and preconditioned conjugate gradients (``cg``) to solve (G + λI)x = g with Ĝ as
the preconditioner.

Conventions (every estimator, so that a damping value means the same thing everywhere):

- **Target.** Ĝ approximates the Gauss-Newton (= Fisher, for softmax cross-entropy) matrix of the *mean
  per-token loss over label tokens* of the fitting set: Ĝ ≈ (1/N_tok) Σ_t J_tᵀ H_t J_t, with N_tok the number of
  label tokens (labels ≠ −100 after the causal shift: position s predicts ``labels[s+1]``), J_t the Jacobian of
  position t's logits and H_t = diag(p_t) − p_t p_tᵀ. Hence ½ΔᵀĜΔ ≈ mean per-token KL(p_θ ‖ p_θ+Δ), in nats.
- **Layout.** Per covered ``nn.Linear`` y = W a (+ b), the augmented weight W̄ = [W, b] (out × in') with
  ā = [a; 1] if there is a bias, flattened row-major; G_W̄ ≈ S ⊗ A with A (in'×in', activations) and S (out×out,
  output gradients). Blocks of different layers are zero (block-diagonal Ĝ).
- **Masking.** Only label tokens carry loss. A and S are summed over the *fed* positions: real (non-pad) tokens
  at or before the sequence's last label-predicting position (later positions cannot influence any loss term).
  A = Σ ā āᵀ / N_pos (mean over fed positions), S = Σ_s g_s g_sᵀ / N_tok (per signal, see ``fisher``). Then
  for a sequence with a single fed position (input ``[x0, x1]``, labels ``[−100, y]``: one label, predicted
  at position 0) and the exact Fisher, G_W̄ = Σ_c vec(g_c ā₀ᵀ) vec(g_c ā₀ᵀ)ᵀ = S ⊗ A exactly; with several fed
  positions the label at t reaches every s ≤ t through attention and Σ_s g_s ā_sᵀ is no Kronecker product.
- **Estimators.** K-FAC: Λ = λ_S λ_Aᵀ. EK-FAC: Λ* = (1/N_tok) Σ_k (Q_Sᵀ G_k Q_A)² with G_k = Σ_s g_s ā_sᵀ the
  per-sequence gradient of one backward signal (exact Fisher: one label position and class at a time; MC: one
  draw of the summed token loss, divided also by ``mc_samples``). Diagonal: D = (1/N_tok) Σ_k G_k². Identity:
  Ĝ = I. Preconditioning: V = Q_S[(Q_Sᵀ ∇W̄ Q_A) / (Λ + δ)]Q_Aᵀ, δ absolute or α·mean(Λ) per layer.
- **Numerics.** Logits upcast to fp32; factors accumulate in fp32 (fp64 for a fp64 model); ``eigh`` in fp64 on
  the symmetrised factor with a finiteness check; eigenvalues clamped ≥ 0, then stored at ``factor_dtype``
  (bf16 allowed) and applied in fp32; parameters' ``.grad`` untouched.
- **Shared inputs.** Layers reading the same input tensor (q/k/v; gate/up) share one A, stored once under
  the first such layer's name.
"""

from kfade.curvature.cg import CGResult, conjugate_gradient
from kfade.curvature.config import CurvatureConfig
from kfade.curvature.curvature import Curvature
from kfade.curvature.fingerprint import model_fingerprint
from kfade.curvature.fit import fit_curvature
from kfade.curvature.ggn import GaussNewton
from kfade.curvature.store import load_or_fit

__all__ = ["CGResult", "Curvature", "CurvatureConfig", "GaussNewton", "conjugate_gradient", "fit_curvature",
           "load_or_fit", "model_fingerprint"]
