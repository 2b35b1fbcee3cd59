"""SCAFFOLD's control variates, by hand."""
import numpy as np

from sitekit.algorithms import scaffold


def test_scaffold_variates_by_hand():
    g = scaffold.corrected_gradient(np.array([1.0]), c_site=np.array([0.5]), c_server=np.array([0.2]))
    np.testing.assert_allclose(g, [0.7])
    c_new = scaffold.site_variate_update(np.array([0.5]), np.array([0.2]), x_global=np.array([1.0]),
                                         y_local=np.array([0.6]), steps=4, lr=0.1)
    np.testing.assert_allclose(c_new, [0.5 - 0.2 + 0.4 / 0.4])
    x, c = scaffold.server_update(np.array([1.0]), np.array([0.2]), [np.array([-0.4]), np.array([0.2])],
                                  [np.array([0.8]), np.array([0.0])], n_sites=4, server_lr=1.0)
    np.testing.assert_allclose(x, [0.9])
    np.testing.assert_allclose(c, [0.2 + 0.5 * 0.4])


def test_scaffold_server_variate_counts_only_reporting_sites():
    c = np.array([1.0, 1.0])
    out = scaffold.server_variate_update(c, [np.array([2.0, 0.0]), np.array([0.0, 4.0])], n_sites=4)
    np.testing.assert_allclose(out, [1.0 + 0.5 * 1.0, 1.0 + 0.5 * 2.0])  # (2/4) * mean
