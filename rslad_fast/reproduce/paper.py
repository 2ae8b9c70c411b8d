"""The paper's Table 2 (Zi et al., ICCV 2021; CIFAR-10, last checkpoint), as ../shared/METHODS.md transcribes it,
and the names the table prints."""

PAPER_COLUMNS = ("clean", "fgsm", "pgd20-sat", "pgd20-trades", "cw", "aa")
_PAPER_ROWS = {
    ("resnet18", "sat"): (84.44, 55.37, 46.22, 48.72, 47.14, 43.64),
    ("resnet18", "trades"): (82.20, 57.86, 52.30, 53.66, 50.69, 49.27),
    ("resnet18", "ard"): (84.23, 59.33, 51.52, 53.74, 51.24, 48.90),
    ("resnet18", "iad"): (83.90, 58.95, 51.35, 53.15, 50.52, 48.48),
    ("resnet18", "rslad"): (83.33, 59.90, 54.14, 55.61, 53.22, 51.32),
    ("mnv2", "sat"): (82.89, 56.43, 49.71, 51.48, 49.07, 45.92),
    ("mnv2", "trades"): (80.57, 56.05, 51.06, 52.36, 49.36, 47.17),
    ("mnv2", "ard"): (83.42, 57.94, 50.63, 52.44, 50.09, 48.01),
    ("mnv2", "iad"): (83.49, 57.44, 49.77, 51.85, 49.41, 46.98),
    ("mnv2", "rslad"): (83.11, 59.08, 53.04, 54.50, 51.60, 49.90),
}
PAPER = {key: dict(zip(PAPER_COLUMNS, row)) for key, row in _PAPER_ROWS.items()}
# natural training: the paper gives the clean accuracy and 0.0 under PGD only
PAPER[("resnet18", "natural")] = {"clean": 94.65, "pgd20-sat": 0.0, "pgd20-trades": 0.0}
PAPER[("mnv2", "natural")] = {"clean": 92.78, "pgd20-sat": 0.0, "pgd20-trades": 0.0}
MODEL_NAMES = {"resnet18": "RN-18", "mnv2": "MNV2"}
METHOD_NAMES = {"natural": "Natural", "sat": "SAT", "trades": "TRADES", "mart": "MART", "ard": "ARD"}
METHOD_NAMES.update({"iad": "IAD", "rslad": "RSLAD", "adaad": "AdaAD", "mtard": "MTARD"})
METHOD_NAMES.update({"dgad": "DGAD", "peeraid": "PeerAiD"})
