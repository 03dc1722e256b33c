"""Datasets and transforms: determinism, mmseg's label mapping, crop rule and padding, errors that name files."""
import numpy as np
import pytest
import torch
from PIL import Image

from denseclip.data.classes import ADE20K_CLASSES
from denseclip.data.procedural import ProceduralShapes
from denseclip.data.segmentation import ADE20K, FolderSegmentation
from denseclip.data.transforms import sample_rng
from denseclip.errors import DataError
from denseclip.clip import CLIP_MEAN, CLIP_STD
from denseclip.data.transforms import TestTransform, TrainTransform, normalize
from denseclip.run.metrics import ConfusionMatrix

# ------------------------------------------------------------------------------------------ procedural


def test_procedural_deterministic_by_seed_epoch_index():
    a, b = ProceduralShapes("train", size=64, seed=3), ProceduralShapes("train", size=64, seed=3)
    x, y = a[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (64, 64) and y.dtype == torch.int64
    assert torch.equal(x, b[5][0]) and torch.equal(y, b[5][1])
    assert not torch.equal(x, a[6][0])
    assert not torch.equal(x, ProceduralShapes("train", size=64, seed=4)[5][0])
    b.set_epoch(1)
    assert not torch.equal(x, b[5][0])
    a.set_epoch(1)
    assert torch.equal(a[5][0], b[5][0])
    # Workers give the same samples as the main process (each sample's rng depends on nothing else).
    loader = torch.utils.data.DataLoader(a, batch_size=2, num_workers=2, sampler=[5, 9, 2, 7])
    xs = torch.cat([batch[0] for batch in loader])
    assert torch.equal(xs, torch.stack([a[i][0] for i in (5, 9, 2, 7)]))


def test_procedural_val_is_fixed_and_labels_valid():
    v1, v2 = ProceduralShapes("val", size=64, seed=0), ProceduralShapes("val", size=64, seed=123)
    v2.set_epoch(7)
    assert len(v1) == 200 and v1.class_names[0] == "background"
    for i in (0, 17, 199):
        assert torch.equal(v1[i][0], v2[i][0]) and torch.equal(v1[i][1], v2[i][1])
    labels = torch.stack([v1[i][1] for i in range(20)])
    assert labels.min() >= 0 and labels.max() < len(v1.class_names)
    assert len(labels.unique()) == len(v1.class_names)  # every class shows up within a few images
    with pytest.raises(IndexError):
        v1[200]


def test_colour_alone_does_not_solve_procedural_shapes():
    """Majority class per colour bin (8 levels per channel), fitted on train and scored on val. It scores about
    0.10 mIoU on these images, no better than predicting background everywhere: colour carries no class."""
    train, val = ProceduralShapes("train"), ProceduralShapes("val")
    k = len(train.class_names)

    def bins(image):
        q = image.astype(np.int64) // 32
        return (q[..., 0] * 8 + q[..., 1]) * 8 + q[..., 2]

    counts = np.zeros(512 * k, np.int64)
    for i in range(200):
        image, label = train.raw(i)
        counts += np.bincount((bins(image) * k + label).ravel(), minlength=512 * k)
    rule = counts.reshape(512, k).argmax(1)
    cm = ConfusionMatrix(k)
    for i in range(100):
        image, label = val.raw(i)
        cm.update(torch.from_numpy(rule[bins(image)]), torch.from_numpy(label.astype(np.int64)))
    assert cm.compute()["mIoU"] < 0.2


# ------------------------------------------------------------------------------------------- OpenCV parity
# mmseg resizes and converts colours with OpenCV; we use torch / torchvision ops. The dev extra installs
# opencv-python-headless, so these compare against whatever OpenCV CI has; then the same checks and the ADE20K
# pipeline run again with cv2 hidden, as on a machine without it.

def opencv_reference(cv2, n=12):
    """(inputs, OpenCV's outputs) on random sizes: bilinear up and down (2x down included: OpenCV's INTER_AREA
    shortcut), nearest labels, RGB -> HSV -> RGB."""
    rng = np.random.default_rng(1)
    cases = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(5, 300, 2))
        nw, nh = (w // 2, h // 2) if i == 0 else (int(v) for v in rng.integers(3, 600, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        cases.append(((img, nw, nh), (cv2.resize(img, (nw, nh)), cv2.resize(img[..., 0], (nw, nh),
                     interpolation=cv2.INTER_NEAREST), hsv, cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))))
    return cases


def assert_ops_match_opencv(T, cases):
    for (img, nw, nh), (resized, nearest, hsv, rgb) in cases:
        t = T.to_tensor(img)
        ours = T.resize_image(t, nw, nh).permute(1, 2, 0).numpy()
        assert ours.shape == resized.shape and np.abs(ours.astype(int) - resized).max() <= 1
        assert np.array_equal(T.resize_label(img[..., 0], nw, nh), nearest)
        assert np.array_equal(T.rgb_to_hsv(t).permute(1, 2, 0).numpy(), hsv)
        back = T.hsv_to_rgb(T.to_tensor(hsv)).permute(1, 2, 0).numpy()
        assert np.abs(back.astype(int) - rgb).max() <= 1


def test_ops_within_one_of_opencv():
    import cv2

    from denseclip.data import transforms
    assert_ops_match_opencv(transforms, opencv_reference(cv2))
    img = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    rt = transforms.hsv_to_rgb(transforms.rgb_to_hsv(transforms.to_tensor(img))).permute(1, 2, 0).numpy()
    assert np.abs(rt.astype(int) - img).max() <= 8  # 8-bit HSV loses a little, as in OpenCV


def test_loader_and_opencv_parity_without_opencv(ade_root, monkeypatch):
    """cv2 hidden (import fails) and denseclip's data modules imported afresh: the ops still match the OpenCV
    outputs recorded before, and the ADE20K train pipeline loads."""
    import importlib
    import sys

    import cv2
    import denseclip.data
    cases = opencv_reference(cv2, n=4)
    monkeypatch.setitem(sys.modules, "cv2", None)
    for name in ("transforms", "image_io", "segmentation"):  # the fresh imports rebind these; restore them afterwards
        monkeypatch.setattr(denseclip.data, name, getattr(denseclip.data, name))
    for name in ("denseclip.data.transforms", "denseclip.data.image_io", "denseclip.data.segmentation"):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError):
        import cv2  # noqa: F401, F811
    T = importlib.import_module("denseclip.data.transforms")
    D = importlib.import_module("denseclip.data.segmentation")
    assert_ops_match_opencv(T, cases)
    ds = D.ADE20K(ade_root, "training", transform=T.TrainTransform(scale=(128, 64), crop_size=(64, 64)))
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64)


# ------------------------------------------------------------------------------------------------- ADE20K

SIZES = [(60, 80), (70, 50), (64, 64)]  # (h, w)


@pytest.fixture
def ade_root(tmp_path):
    """A fake ADEChallengeData2016: random JPEGs and blocky labels with values 0..150 (0 = 'other')."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_{i:03d}.jpg")
            label = np.kron(rng.integers(0, 151, (h // 10 + 1, w // 10 + 1)), np.ones((10, 10)))[:h, :w]
            label[0, :3] = [0, 1, 150]  # make sure the edge values are present
            Image.fromarray(label.astype(np.uint8)).save(root / "annotations" / split / f"ADE_{i:03d}.png")
    return root


def test_ade20k_label_mapping_and_padding(ade_root):
    # Resize factor 1 for image 0 (80 x 60), no flip, no photometric, a crop larger than the image: what comes
    # out is the image normalised and the mapped label, padded bottom/right with 0 (normalised) and 255.
    t = TrainTransform(scale=(80, 60), ratio_range=None, crop_size=(64, 96), flip_prob=0.0, photometric=False)
    ds = ADE20K(ade_root, "training", transform=t)
    assert len(ds) == 3 and ds.class_names == list(ADE20K_CLASSES) and len(ds.class_names) == 150
    image, label = ds[0]
    assert image.shape == (3, 64, 96) and label.shape == (64, 96) and label.dtype == torch.int64
    raw = np.asarray(Image.open(ade_root / "annotations/training/ADE_000.png")).astype(np.int64)
    want = np.where(raw == 0, 255, raw - 1)
    assert torch.equal(label[:60, :80], torch.from_numpy(want))
    assert label[0, :3].tolist() == [255, 0, 149]
    assert (label[60:] == 255).all() and (label[:, 80:] == 255).all()
    pixels = np.array(Image.open(ade_root / "images/training/ADE_000.jpg").convert("RGB"))
    assert torch.equal(image[:, :60, :80], normalize(pixels))
    assert (image[:, 60:] == 0).all() and (image[:, :, 80:] == 0).all()
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    assert torch.allclose(image[:, :60, :80] * torch.tensor(CLIP_STD)[:, None, None] + mean,
                          torch.from_numpy(pixels).permute(2, 0, 1) / 255, atol=1e-6)


def test_ade20k_default_train_pipeline_is_reproducible(ade_root):
    ds = ADE20K(ade_root, "training", transform=TrainTransform(scale=(128, 64), crop_size=(64, 64)), seed=1)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 64, 64) and label.shape == (64, 64)
        assert image.dtype == torch.float32 and label.dtype == torch.int64
        assert ((label >= 0) & (label < 150) | (label == 255)).all()
        again = ds[i]
        assert torch.equal(image, again[0]) and torch.equal(label, again[1])
    first = ds[0][0]
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], first)
    ds.set_epoch(0)
    assert torch.equal(ds[0][0], first)


def test_test_transform_keeps_label_at_original_size(ade_root):
    ds = ADE20K(ade_root, "validation", transform=TestTransform(scale=(128, 64)))
    image, label = ds[1]  # 50 x 70 (w x h): factor min(128 / 70, 64 / 50) = 1.28 -> 64 x 90
    assert image.shape == (3, 90, 64) and label.shape == (70, 50)
    raw = np.asarray(Image.open(ade_root / "annotations/validation/ADE_001.png")).astype(np.int64)
    assert torch.equal(label, torch.from_numpy(np.where(raw == 0, 255, raw - 1)))


def test_unreadable_and_missing_files_are_named(ade_root, tmp_path):
    jpg = ade_root / "images/training/ADE_002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated JPEG
    ds = ADE20K(ade_root, "training")
    with pytest.raises(DataError, match="ADE_002.jpg"):
        ds[2]
    (ade_root / "annotations/training/ADE_001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_001"):
        ADE20K(ade_root, "training")
    (tmp_path / "empty/images/training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="data/README.md"):
        ADE20K(tmp_path / "empty", "training")
    with pytest.raises(ValueError, match="split"):
        ADE20K(ade_root, "train")


def test_folder_dataset_with_class_file(ade_root, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(151)) + "\n")
    ds = FolderSegmentation(ade_root / "images/validation", ade_root / "annotations/validation", names)
    assert len(ds.class_names) == 151 and ds[0][1].max() == 150  # no reduce_zero_label: 0 stays a class
    few = FolderSegmentation(ade_root / "images/validation", ade_root / "annotations/validation", ["a", "b"])
    with pytest.raises(ValueError, match="ADE_000.png"):
        few[0]


# ------------------------------------------------------------------------------------------------ crop rule

def test_random_crop_follows_cat_max_ratio_with_the_same_rng():
    label = np.zeros((256, 256), np.uint8)
    label[:50] = 255  # ignored pixels do not count towards any class
    label[100:140, 100:140] = 1  # the only way to get a second class: a crop that overlaps this block
    t = TrainTransform(crop_size=(64, 64), cat_max_ratio=0.75)
    ok_draws = ok_rule = 0
    for seed in range(200):
        y, x = t.crop_box(label, np.random.default_rng(seed))
        # Replay mmseg's loop with an identical generator: up to 10 checked draws, else the 11th unchecked.
        rng = np.random.default_rng(seed)
        draws = [(int(rng.integers(0, 193)), int(rng.integers(0, 193))) for _ in range(11)]
        good = []
        for cy, cx in draws[:10]:
            values, cnt = np.unique(label[cy:cy + 64, cx:cx + 64], return_counts=True)
            cnt = cnt[values != 255]
            good.append(len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75)
        expect = draws[good.index(True)] if any(good) else draws[10]
        assert (y, x) == expect
        ok_draws += any(good)
        values, cnt = np.unique(label[y:y + 64, x:x + 64], return_counts=True)
        cnt = cnt[values != 255]
        ok_rule += len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75
    assert ok_rule >= ok_draws > 20  # whenever one of the 10 draws passes, the chosen crop passes
    plain = TrainTransform(crop_size=(64, 64), cat_max_ratio=1.0)
    passes = 0
    for seed in range(200):
        y, x = plain.crop_box(label, np.random.default_rng(seed))
        values, cnt = np.unique(label[y:y + 64, x:x + 64], return_counts=True)
        cnt = cnt[values != 255]
        passes += len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75
    assert passes < ok_rule / 2  # without the rule, good crops are much rarer


def test_train_transform_draws_only_from_its_rng():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (100, 150)).astype(np.uint8)
    t = TrainTransform(scale=(128, 64), crop_size=(48, 48))
    a, b = t(image, label, sample_rng(0, 0, 3)), t(image, label, sample_rng(0, 0, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    np.random.seed(1)  # the global state is irrelevant
    c = t(image, label, sample_rng(0, 0, 3))
    assert torch.equal(a[0], c[0])
