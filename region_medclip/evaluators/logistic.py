"""L2-regularised logistic regression in float64 numpy, solved by L-BFGS-B (scipy).

Both models minimise scikit-learn's ``LogisticRegression(C=c, solver="lbfgs")`` objective

    0.5·‖W‖² + c·Σᵢ lossᵢ          (the bias is not penalised)

with ``lossᵢ`` the binary or the softmax cross-entropy of example i. scikit-learn hands L-BFGS
the same objective divided by ``c·n`` (the mean loss plus ``‖W‖² / (2·c·n)``), whose gradient
does not grow with n; so does this module, so that one gradient tolerance suits every subset
size. The minimiser is unique (the objective is strictly convex in W, and in the bias given W
for the binary model); the multinomial biases are determined only up to a common constant,
which is fixed by starting at zero, where the bias gradient sums to zero and stays so (every
L-BFGS step is a combination of gradients), exactly as in scikit-learn.
"""

import numpy as np
import scipy.optimize
import scipy.special

__all__ = ["fit_binary", "fit_multinomial", "GRADIENT_TOLERANCE"]

# Stop when every gradient entry of the mean-scaled objective is below this: far below
# scikit-learn's default tol=1e-4, so that the result is the optimum rather than a point near
# it (the coefficients' error is at most about tolerance · c · n, the inverse curvature).
GRADIENT_TOLERANCE = 1e-9


def _minimize(loss_and_grad_fn, size: int, max_iter: int) -> np.ndarray:
    """Minimises ``loss_and_grad_fn(theta [size]) → (loss, grad [size])`` from zero."""
    result = scipy.optimize.minimize(
        loss_and_grad_fn,
        np.zeros(size),
        jac=True,
        method="L-BFGS-B",
        # ftol at a few ulps, as scikit-learn sets it: the gradient test decides when to stop.
        options=dict(
            maxiter=max_iter, maxls=50, gtol=GRADIENT_TOLERANCE, ftol=64 * np.finfo(float).eps
        ),
    )
    return result.x


def fit_binary(
    features: np.ndarray, targets: np.ndarray, *, c: float, max_iter: int = 1000
) -> tuple[np.ndarray, float]:
    """Binary logistic regression.

    Args:
      features: ``[n, D]``.
      targets: ``[n]`` with values 0 and 1.
      c: inverse regularisation strength (scikit-learn's ``C``).
      max_iter: L-BFGS iterations at most.

    Returns:
      ``(w [D], b)``: the decision function is ``features @ w + b`` (the log-odds of 1).
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    n, dim = x.shape
    penalty = 1.0 / (c * n)

    def loss_and_grad(theta):
        w, b = theta[:dim], theta[dim]
        z = x @ w + b
        # log(1 + e^z) − y·z is the cross-entropy of sigmoid(z) against y, overflow-free.
        loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * penalty * (w @ w)
        dz = (scipy.special.expit(z) - y) / n
        return loss, np.concatenate([x.T @ dz + penalty * w, [dz.sum()]])

    theta = _minimize(loss_and_grad, dim + 1, max_iter)
    return theta[:dim], float(theta[dim])


def fit_multinomial(
    features: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    *,
    c: float,
    max_iter: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial (softmax) logistic regression with one weight vector per class.

    Args:
      features: ``[n, D]``.
      targets: ``[n]`` int classes in ``[0, num_classes)``; each class should occur (the bias
        of an absent class has no finite optimum).
      num_classes: K.
      c: inverse regularisation strength (scikit-learn's ``C``).
      max_iter: L-BFGS iterations at most.

    Returns:
      ``(W [D, K], b [K])`` with ``Σ b = 0``: the logits are ``features @ W + b``.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(targets)
    n, dim = x.shape
    one_hot = np.eye(num_classes)[y]
    penalty = 1.0 / (c * n)

    def loss_and_grad(theta):
        w = theta[: dim * num_classes].reshape(dim, num_classes)
        b = theta[dim * num_classes :]
        z = x @ w + b
        lse = scipy.special.logsumexp(z, axis=1)
        loss = np.mean(lse - (z * one_hot).sum(1)) + 0.5 * penalty * np.sum(w * w)
        dz = (np.exp(z - lse[:, None]) - one_hot) / n
        return loss, np.concatenate([(x.T @ dz + penalty * w).ravel(), dz.sum(0)])

    theta = _minimize(loss_and_grad, (dim + 1) * num_classes, max_iter)
    w = theta[: dim * num_classes].reshape(dim, num_classes)
    b = theta[dim * num_classes :]
    # Σ b is zero up to rounding already (see the module docstring); make it exact.
    return w, b - b.mean()
