"""The `linear` protocol: a closed-form linear probe on frozen pre-logits features, the fast
VTAB-1k evaluation for use during pretraining (minutes on a GPU, where fine-tuning 19 tasks
takes hours).

The solve is big_vision's few-shot evaluator's (`big_vision/evaluators/fewshot_lsr.py`),
`pipeline.ridge.Ridge`, the one the few-shot probe during pretraining uses: features
standardised with the training images' statistics, a constant bias feature, an
L2-regularised least-squares map to {-1, 1}^K targets.
big_vision fixes the regulariser (2^10) for its few-shot sets; with VTAB-1k's splits we choose
it instead, as the fine-tuning protocols choose their learning rate (ViT App. B.1.1):

    1. selection  for each L2 in `L2_GRID`: fit on train800, score val200;
    2. choice     the L2 best on val200 (ties: the larger, the smoother map);
    3. final      refit on train800val200 at that L2, top-1 on test.
The test set is the test split's first `sweep.test_images` images (0: all of it) in the list's
order, so that a probe during pretraining stays bounded (SUN397's test split has 21,750).

Features are the pre-logits: the tanh representation layer's output where the checkpoint has
one, else the pooled token (as big_vision's `pre_logits`), at `finetune.resolution`, images only
resized (the evaluation preprocessing of the fine-tuning protocols). One Ray Tune trial per
task (eval/sweep.py), each reading its own task's splits.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.ridge import Ridge

# Powers of 2 around big_vision's 2^10, wide enough for features standardised per dimension.
L2_GRID = tuple(2.0 ** p for p in range(-4, 17, 2))


def choose_l2(x_train: torch.Tensor, y_train: np.ndarray, x_val: torch.Tensor,
              y_val: np.ndarray, num_classes: int,
              grid: tuple[float, ...] = L2_GRID) -> tuple[float, dict[float, float]]:
    """-> (the L2 best on the validation set, {l2: validation top-1 in percent})."""
    ridge, yv = Ridge(x_train, y_train, num_classes), np.asarray(y_val)
    scores = {l2: _top1(ridge.predict(x_val, l2), yv) for l2 in grid}
    best = max(grid, key=lambda l2: (scores[l2], l2))
    return best, scores


def probe(x_train: torch.Tensor, y_train: np.ndarray, x_val: torch.Tensor, y_val: np.ndarray,
          x_test: torch.Tensor, y_test: np.ndarray, num_classes: int,
          grid: tuple[float, ...] = L2_GRID) -> dict:
    """The protocol on features: choose L2 on (train, val), refit on train + val, score test.
    -> {"top1", "l2", "val200": {l2: top1}} (percent)."""
    l2, val = choose_l2(x_train, y_train, x_val, y_val, num_classes, grid)
    x_all = torch.cat([torch.as_tensor(x_train), torch.as_tensor(x_val)])
    y_all = np.concatenate([np.asarray(y_train), np.asarray(y_val)])
    preds = Ridge(x_all, y_all, num_classes).predict(x_test, l2)
    return {"top1": _top1(preds, np.asarray(y_test)), "l2": l2, "val200": val}


def _top1(preds: torch.Tensor, labels: np.ndarray) -> float:
    return 100.0 * float((preds.numpy() == labels).mean())


def feature_model(config: dict, state: dict, resolution: int):
    """The pre-trained ViT, head and all (its pre-logits layer is the representation), at
    `resolution`, in eval mode."""
    from pipeline.model import ViT, ViTConfig

    model = ViT(ViTConfig.from_dict(config))
    model.load_state_dict(state, strict=True)
    model.set_image_size(resolution)
    return model.eval()


@torch.no_grad()
def features(model, images: np.ndarray, device: torch.device | str = "cpu",
             batch_size: int = 256) -> torch.Tensor:
    """uint8 (n, S, S, 3) -> pre-logits (n, D), float32 on the CPU."""
    from eval.finetune import _autocast
    from pipeline.data.transforms import to_model_input

    device = torch.device(device)
    model.to(device)
    out = []
    for lo in range(0, len(images), batch_size):
        x = to_model_input(torch.tensor(images[lo:lo + batch_size]).to(device),
                           model.cfg.input_mean, model.cfg.input_std)
        with _autocast(device):
            out.append(model.forward_head(model.forward_features(x), pre_logits=True)
                       .float().cpu())
    return torch.cat(out)


def linear_trial(config: dict, *, data_root: str, pretrained, resolution: int,
                 test_images: int, gpus: float, cpus: float) -> None:
    """One task of the `linear` protocol, in a Tune actor: config = {"trial": {"task", "lr",
    "seed", "phase"}} as the fine-tuning trials' (lr unused)."""
    import time

    from ray import tune

    from eval.data import Encoded, decode, read_encoded
    from eval.tasks import BY_NAME

    task = BY_NAME[config["trial"]["task"]]
    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model = feature_model(pretrained.config, pretrained.state, resolution)

    def split(name: str, limit: int = 0):
        enc = read_encoded(data_root, task, name)
        if limit:
            enc = Encoded(enc.images[:limit], enc.labels[:limit])
        decoded = decode(enc, resolution, f"{task.name}/{name}")
        return features(model, decoded.images, device), np.asarray(decoded.labels)

    (xt, yt), (xv, yv), (xs, ys) = (split("train800"), split("val200"),
                                    split("test", test_images))
    result = probe(xt, yt, xv, yv, xs, ys, task.num_classes)
    tune.report({"step": 1, "top1": result["top1"], "l2": result["l2"],
                 "val200": {f"{k:g}": v for k, v in result["val200"].items()},
                 "eval_images": len(ys), "diverged": False, "task": task.name,
                 "train_time_s": time.perf_counter() - start})
