"""What codes are good for: a linear probe of the labels, and anomaly detection by reconstruction."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                   test_labels: np.ndarray) -> float:
    """Test accuracy of a multinomial logistic regression (scikit-learn, L2 with C=1, lbfgs, features
    standardised on the training set) fitted to the training features."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_features, train_labels)
    return float(probe.score(test_features, test_labels))


def anomaly_auroc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher = more anomalous) at finding the anomalies:
    1 when every anomaly scores above every normal example, 0.5 for scores that carry no signal."""
    return float(roc_auc_score(is_anomaly.astype(int), scores))
