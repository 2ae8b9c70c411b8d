"""PeerAiD (Jung et al., CVPR 2024, "PeerAiD: Improving Adversarial Distillation from a Specialized Peer
Tutor"): NOT IMPLEMENTED. This module holds no code and registers nothing (`methods/__init__.py` does not
import it; `--method peeraid` is an unknown method): it records what the official code does and what this
engine would need to train it faithfully.

Official code: jaewonalive/PeerAiD (read at commit cd12e92), `main.py` (arguments lines 24-71, the configs
read at 80-116, models 158-170, attacks 182-186, optimizers 219-220, `train_kd` lines 315-432,
`adjust_learning_rate` 840-852, the epoch loop 889-905), `attack_function.py` (`LinfPeerAttack`),
`utils/SWA.py` (`moving_average`, `bn_update`), `configs/*.json` and `training_scripts/*.sh` (= README.md's
commands for Table 1).

What it trains, per batch (`train_kd`, main.py:340-404):
- the peer P (`--p_type`, the student's own architecture in every official script: resnet18 / resnet18,
  wideresnet34x10 / wideresnet34x10), randomly initialised and trained alongside the student: no pretrained
  teacher. P(x) in eval mode under no_grad (main.py:346-350);
- the attack (`LinfPeerAttack` on the student, main.py:186, 352): the student in eval mode, x + 0.001*N(0,1),
  `--k_train` 10 sign steps of 2/255 (main.py:29, 134) in the 8/255 ball (main.py:131) maximizing
  sum KL(P(x) || S(x')), then a clamp to [0, 1]; the student is left in eval mode by the attack and put back in
  train mode at main.py:355;
- the peer's loss (main.py:359-363), P and S in train mode on x':
  gamma1 * CE(P(x'), y) + gamma2 * tau^2 * KLDivLoss()(log_softmax(P(x')/tau), softmax(S(x')/tau)), the
  mean over B*C, with S(x') NOT detached: this term's gradient reaches the student too;
- the student's loss (main.py:376-397): S(x') again (a second train-mode forward: BatchNorm sees x' twice),
  S(x), then lamb1 * CE(S(x'), y) + lamb2 * T^2 * KL(P(x')/T detached || S(x')/T) + lamb3 * T^2 *
  KL(S(x)/T || S(x')/T), each `KLDivLoss()` (mean over B*C), S(x) not detached;
- one backward of loss_peer + loss_student, then both SGD steps (main.py:400-404).
Settings (training_scripts/resnet18_cifar10.sh, configs/PeerAiD_resnet18_cifar10.json): T 5, gamma1 1,
gamma2 0.1 (1 on CIFAR-100), tau 1, lamb1 0, lamb2 1, lamb3 1; 300 epochs, batch 128; peer and student each
their own SGD (lr 0.1, momentum 0.9, weight decay 2e-4, main.py:219-220) with lr /10 at epochs 214, 259, 284
(`lr_decay_epochs_peer`, `lr_decay_epochs_student`, applied by `adjust_learning_rate` before each epoch);
`--swa_s`: from epoch 214 (the student's first decay, main.py:110-111) a stochastic-weight-averaged copy of
the student, `moving_average(swa, student, 1/(n+1))` after every epoch, then `bn_update` over the whole
training loader (main.py:427-432); the SWA student is evaluated (PGD, AutoAttack) beside the student.

What this engine lacks, and why it is not done here:
- a second trained model: `engine/build.py`'s Parts hold one student with one optimizer and one scheduler
  (the method's SCHEDULE); the peer needs its own module, its own SGD and lr schedule, its own DDP wrapper under
  torchrun (its gradients all-reduced like the student's), and its weights and momentum in every checkpoint
  for a bitwise --resume (`engine/checkpoint.py` saves one model and one optimizer);
- a loss of two models: `Method.loss` returns one scalar backpropagated into the student's parameters; the
  peer's term backpropagates into both (S(x') is not detached), so `engine/step.py` would have to step the
  peer's optimizer from the same backward;
- the SWA student: an averaged copy updated at each epoch's end plus a BatchNorm pass over the training set
  (a training-set loop outside the step, `engine/loop.py`), checkpointed, and evaluated as a second model
  (`evaluate`, `reproduce`'s table): which of the two the paper's Table 1 reports is not stated in the code,
  which prints both.
Each is an engine change across build, step, loop, checkpoint, DDP and evaluation; a partial version (no
peer optimizer of its own, no SWA) would not be PeerAiD, so none is registered.
"""
