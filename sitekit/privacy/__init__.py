"""Differential privacy for federations: mechanisms, accounting and the budget.

One home per concept:

- :mod:`sitekit.privacy.accountant` — what a site (dp-sgd) or the federation (client-dp) has
  spent: Opacus's RDP or PRV accountant, persisted as JSON so a restart keeps the spent ε.
- :mod:`sitekit.privacy.budget` — the schedule a spec implies (sampling rate, steps per round,
  the noise multiplier given or derived from a target ε, δ) and ε after each round; used by
  the flow before a run starts and by each site while it runs.
- :mod:`sitekit.privacy.dpsgd` — sample-level DP-SGD (Abadi et al. 2016) at a site with Opacus
  1.6, its hooks attached to the site's own model (no wrapper module in the model tree).
- :mod:`sitekit.privacy.client_dp` — client-level DP-FedAvg (McMahan et al. 2018): clip each
  site's update, add Gaussian noise at the server or at the site.

What the guarantees cover: the training records (dp-sgd: each training image or row of a
site; client-dp: a whole site's training data). Evaluation metrics a site reports are
aggregates over its held-out test cases and sit outside the guarantee, as in the literature;
the training loss, which is a function of training data, is not reported under DP.
"""
from sitekit.privacy.accountant import PrivacyAccountant, epsilon_for, noise_multiplier_for
from sitekit.privacy.budget import Budget, federation_budget, site_budget

__all__ = ["PrivacyAccountant", "epsilon_for", "noise_multiplier_for", "Budget", "site_budget", "federation_budget"]
