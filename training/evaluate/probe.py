"""The linear probe: a second reader of every feature set, next to LightGBM, on the same splits.

A few hundred labelled users and hundreds of embedding dimensions are where gradient-boosted trees
read worst and a regularized linear model reads best (the question a linear probe answers is
"is the information linearly there?", the usual test of a representation). The probe is:

- features standardized (mean 0, variance 1, fitted on the training rows only); a missing value
  (a user without the feature, a category the user never met) becomes the training mean, i.e. 0;
- binary/multiclass: L2 logistic regression, its strength C chosen by an inner 3-fold CV on the
  training rows (log-loss) among `cs`;
- regression: ridge, its alpha chosen among `alphas` by efficient leave-one-out on the training rows.

The regularization is chosen inside each training split, never on the scored rows, so the probe
obeys the same no-peeking rule as LightGBM. `LinearProbe.model` has LightGBM's signature, so
`protocol.run_protocol` fits it on the same splits unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from training.evaluate.protocol import Task

READERS = ("lightgbm", "linear")
LINEAR_SUFFIX = " (linear)"  # a feature set read by the probe is reported as "<set> (linear)"


@dataclass(frozen=True)
class LinearProbe:
    cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # logistic regression strengths tried
    alphas: tuple[float, ...] = (1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # ridge penalties tried
    inner_folds: int = 3
    max_iter: int = 500

    def model(self, task: Task, seed: int):
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegressionCV, RidgeCV
        from sklearn.model_selection import StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if task == "regression":
            head = RidgeCV(alphas=self.alphas)
        else:
            head = LogisticRegressionCV(Cs=list(self.cs), cv=StratifiedKFold(self.inner_folds, shuffle=True,
                                                                             random_state=seed),
                                        scoring="neg_log_loss", max_iter=self.max_iter, n_jobs=1,
                                        **_plain_l2(LogisticRegressionCV))
        # keep_empty_features: a column empty in a training split stays (as 0), so widths agree
        return make_pipeline(SimpleImputer(strategy="mean", keep_empty_features=True), StandardScaler(), head)


def _plain_l2(cls) -> dict:
    """scikit-learn >= 1.8 asks for the L2 penalty as l1_ratios=(0,) and warns otherwise; older ones lack it."""
    from inspect import signature

    wanted = {"l1_ratios": (0.0,), "use_legacy_attributes": False}
    return {k: v for k, v in wanted.items() if k in signature(cls).parameters}


def linear_name(feature_set: str) -> str:
    return f"{feature_set}{LINEAR_SUFFIX}"
