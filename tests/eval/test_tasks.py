"""The VTAB-1k task table against the VTAB-1k definitions (Zhai et al. 2019)."""

import pytest

from eval.tasks import BY_NAME, GROUPS, REFERENCE, TASKS, select, summarize


def test_nineteen_tasks_in_three_groups():
    assert len(TASKS) == 19 and len(BY_NAME) == 19
    assert [sum(t.group == g for t in TASKS) for g in GROUPS] == [7, 4, 8]
    assert sum(t.num_classes for t in TASKS) == 102 + 100 + 47 + 102 + 37 + 10 + 397 + 2 + 10 \
        + 45 + 5 + 8 + 6 + 6 + 4 + 16 + 16 + 18 + 9


def test_bit_supp_f_exceptions():
    assert {t.name for t in TASKS if not t.flip} == {"dsprites_ori", "smallnorb_azi",
                                                     "dsprites_loc"}
    assert {t.name for t in TASKS if not t.crop} == {"clevr_count", "clevr_dist", "dmlab",
                                                     "kitti", "dsprites_loc"}
    # Training images are stored at BiT's pre-crop size (448 for 384) only where a task crops.
    from eval.data import train_size

    assert train_size(BY_NAME["cifar"], 384) == 448
    assert train_size(BY_NAME["dsprites_loc"], 384) == 384


def test_select():
    assert [t.name for t in select("specialized")] == ["patch_camelyon", "eurosat", "resisc45",
                                                      "diabetic_retinopathy"]
    assert [t.name for t in select("dtd, cifar")] == ["cifar", "dtd"]
    with pytest.raises(ValueError, match=r"unknown VTAB task\(s\) \['imagenet'\]"):
        select("dtd,imagenet")


@pytest.mark.parametrize("model,groups,mean19,mean3", [
    ("vit-h14-jft", (86.69, 87.00, 65.03), 77.63, 79.57),
    ("vit-l16-jft", (85.56, 86.72, 62.96), 76.29, 78.41),
    ("vit-l16-i21k", (83.27, 84.65, 57.50), 72.71, 75.14)])
def test_reference_means_match_the_paper(model, groups, mean19, mean3):
    s = summarize(REFERENCE[model])
    assert [round(s[g], 2) for g in GROUPS] == list(groups)
    assert round(s["mean"], 2) == mean19 and round(s["mean_of_groups"], 2) == mean3
