"""Datasets on tiny copies written by the tests in the real on-disk formats."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from libs.datasets import DATASETS, get_dataset
from libs.errors import ConfigError, DataError, MissingFileError


def _to_unit(arr_hwc_uint8):
    return torch.from_numpy(np.array(arr_hwc_uint8)).permute(2, 0, 1).float() / 127.5 - 1


def _flip_pattern(dataset, originals):
    """For each item: 1 if flipped, 0 if not (fails if it is neither)."""
    pattern = []
    for i, orig in enumerate(originals):
        x = dataset[i]['x']
        if torch.allclose(x, orig, atol=1e-6):
            pattern.append(0)
        elif torch.allclose(x, orig.flip(-1), atol=1e-6):
            pattern.append(1)
        else:
            raise AssertionError(f"item {i} is neither the image nor its mirror")
    return pattern


# ---------------------------------------------------------------- registry

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test downloads: torchvision's CIFAR10 downloader fails as it does without a network."""
    import torchvision
    import urllib.error

    def no_network(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', no_network)

def test_registry_names():
    for name in ('cifar10', 'celeba', 'imagenet', 'image_folder', 'digits',
                 'imagenet256_features', 'imagenet512_features', 'mscoco256_features'):
        assert name in DATASETS


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as e:
        get_dataset('cifar100')
    assert 'cifar10' in str(e.value) and 'digits' in str(e.value) and 'image_folder' in str(e.value)


def test_unknown_and_missing_kwargs(tmp_path):
    with pytest.raises(ConfigError) as e:
        get_dataset('cifar10', path=str(tmp_path), random_flips=True)
    assert 'random_flips' in str(e.value) and 'random_flip' in str(e.value)
    with pytest.raises(ConfigError) as e:
        get_dataset('imagenet', path=str(tmp_path))
    assert 'resolution' in str(e.value)


def test_name_implied_kwargs_cannot_be_contradicted():
    with pytest.raises(ConfigError, match='resolution'):
        get_dataset('imagenet256_features', path='x', resolution=512)


@pytest.mark.parametrize('name,kwargs', [
    ('cifar10', {}), ('celeba', {}), ('imagenet', {'resolution': 64}), ('image_folder', {'resolution': 32})])
def test_missing_path_says_how_to_prepare(tmp_path, name, kwargs):
    missing = str(tmp_path / 'nowhere')
    with pytest.raises(MissingFileError) as e:
        get_dataset(name, path=missing, **kwargs)
    assert missing in str(e.value)
    with pytest.raises(ConfigError):
        get_dataset(name, path=None, **kwargs)


def test_empty_folder_says_how_to_prepare(tmp_path):
    with pytest.raises(MissingFileError, match='cifar-10-python.tar.gz'):
        get_dataset('cifar10', path=str(tmp_path))
    with pytest.raises(MissingFileError, match='img_align_celeba'):
        get_dataset('celeba', path=str(tmp_path))
    with pytest.raises(MissingFileError, match='train'):
        get_dataset('imagenet', path=str(tmp_path), resolution=64)
    with pytest.raises(MissingFileError, match='no images'):
        get_dataset('image_folder', path=str(tmp_path), resolution=32)


# ---------------------------------------------------------------- cifar10

N_PER_BATCH = 40


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory):
    """<root>/cifar-10-batches-py written like the release: Python-2 style pickles with byte keys."""
    root = tmp_path_factory.mktemp('cifar')
    folder = root / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        data = rng.integers(0, 256, (N_PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(rng.integers(0, 10)) for _ in range(N_PER_BATCH)]
        with open(folder / name, 'wb') as f:
            pickle.dump({b'batch_label': name.encode(), b'labels': labels, b'data': data,
                         b'filenames': [b'x.png'] * N_PER_BATCH}, f, protocol=2)
        arrays[name] = (data, labels)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [b'c%d' % i for i in range(10)]}, f, protocol=2)
    return root, arrays


def test_cifar10_reads_release_batches(cifar_root):
    root, arrays = cifar_root
    for path in (str(root), str(root / 'cifar-10-batches-py')):  # the folder or its parent
        data = get_dataset('cifar10', path=path, random_flip=False)
        assert data.data_shape == (3, 32, 32) and data.kind == 'pixels' and data.num_classes == 10
        assert len(data.train) == 5 * N_PER_BATCH
    raw, labels = arrays['data_batch_2']
    item = data.train[N_PER_BATCH + 7]  # 8th image of the second batch
    assert item['x'].shape == (3, 32, 32) and item['x'].dtype == torch.float32
    assert item['y'].dtype == torch.int64 and int(item['y']) == labels[7]
    # The release stores 1024 red, then 1024 green, then 1024 blue values, rows first.
    r = raw[7, :1024].reshape(32, 32)
    b = raw[7, 2048:].reshape(32, 32)
    np.testing.assert_allclose(item['x'][0].numpy(), r / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(item['x'][2].numpy(), b / 127.5 - 1, atol=1e-6)
    assert item['x'].min() >= -1 and item['x'].max() <= 1


def test_cifar10_flips_half_reproducibly(cifar_root):
    root, arrays = cifar_root
    plain = get_dataset('cifar10', path=str(root), random_flip=False).train
    flipping = get_dataset('cifar10', path=str(root), random_flip=True).train
    originals = [plain[i]['x'] for i in range(len(plain))]
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(1)
    first = _flip_pattern(flipping, originals)
    # 200 fair coin flips: mean 0.5, std 0.035; [0.35, 0.65] is more than 4 standard deviations.
    assert 0.35 < np.mean(first) < 0.65
    torch.manual_seed(123)
    random.seed(2)  # Python's and numpy's RNGs must play no part
    np.random.seed(2)
    assert _flip_pattern(flipping, originals) == first
    torch.manual_seed(124)
    assert _flip_pattern(flipping, originals) != first


def test_cifar10_dataloader_workers_reproducible(cifar_root):
    root, _ = cifar_root
    data = get_dataset('cifar10', path=str(root), random_flip=True)

    def run():
        loader = torch.utils.data.DataLoader(data.train, batch_size=50, shuffle=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(7))
        return [(b['x'], b['y']) for b in loader]

    a, b = run(), run()
    assert a[0][0].shape == (50, 3, 32, 32) and a[0][1].shape == (50,) and a[0][1].dtype == torch.int64
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_cifar10_corrupt_batch(cifar_root, tmp_path):
    root, _ = cifar_root
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    for i in range(1, 6):
        src = root / 'cifar-10-batches-py' / f'data_batch_{i}'
        (folder / src.name).write_bytes(src.read_bytes()[:100] if i == 3 else src.read_bytes())
    with pytest.raises(DataError, match='data_batch_3'):
        get_dataset('cifar10', path=str(tmp_path))
    (folder / 'data_batch_3').unlink()
    with pytest.raises(MissingFileError, match='data_batch_3'):
        get_dataset('cifar10', path=str(tmp_path))


def test_cifar10_offline_says_what_to_download_and_where(tmp_path):
    target = tmp_path / 'cifar'
    with pytest.raises(MissingFileError) as e:
        get_dataset('cifar10', path=str(target))
    message = str(e.value)
    assert '\n' not in message
    assert 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz' in message and str(target) in message


def test_cifar10_downloads_itself_into_the_configured_folder(cifar_root, tmp_path, monkeypatch):
    import shutil

    import torchvision

    root, arrays = cifar_root
    calls = []

    def fake_download(path, train, download):
        # What torchvision's downloader leaves behind: <path>/cifar-10-batches-py/data_batch_1..5.
        calls.append((path, train, download))
        shutil.copytree(root / 'cifar-10-batches-py', os.path.join(path, 'cifar-10-batches-py'))
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', fake_download)
    target = str(tmp_path / 'new')
    data = get_dataset('cifar10', path=target, random_flip=False)
    assert calls == [(target, True, True)] and len(data.train) == 5 * N_PER_BATCH
    assert torch.equal(data.train[0]['y'], torch.tensor(arrays['data_batch_1'][1][0]))
    get_dataset('cifar10', path=target)  # present now: no second download
    assert len(calls) == 1


# ---------------------------------------------------------------- celeba

def _face_marker_image():
    """A 178x218 aligned-CelebA-sized image: white exactly on the paper's crop (rows 57..184,
    cols 25..152), black elsewhere, with a red 16x16 square in the crop's top-left corner."""
    arr = np.zeros((218, 178, 3), np.uint8)
    arr[57:185, 25:153] = 255
    arr[57:73, 25:41] = (255, 0, 0)
    return arr


@pytest.fixture(scope='module')
def celeba_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('celeba')
    img_dir = root / 'img_align_celeba'
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for k in range(1, 6):
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(img_dir / f'{k:06d}.jpg')
    # Lossless PNG for the geometry check (JPEG would blur the marker edges).
    Image.fromarray(_face_marker_image()).save(img_dir / '000006.png')
    (root / 'list_eval_partition.txt').write_text(
        '000001.jpg 0\n000002.jpg 0\n000003.jpg 0\n000004.jpg 1\n000005.jpg 2\n000006.png 2\n')
    return root


def test_celeba_splits_and_items(celeba_root):
    data = get_dataset('celeba', path=str(celeba_root))
    assert len(data.train) == 3 and data.num_classes == 0 and data.kind == 'pixels'
    assert data.data_shape == (3, 64, 64)
    item = data.train[0]
    assert set(item) == {'x'} and item['x'].shape == (3, 64, 64) and item['x'].dtype == torch.float32
    assert item['x'].min() >= -1 and item['x'].max() <= 1 and item['x'].std() > 0.1
    assert len(get_dataset('celeba', path=str(celeba_root), split='valid').train) == 1
    assert len(get_dataset('celeba', path=str(celeba_root), split='test').train) == 2
    assert len(get_dataset('celeba', path=str(celeba_root), split='all').train) == 6
    # The image folder itself is accepted as path too.
    assert len(get_dataset('celeba', path=str(celeba_root / 'img_align_celeba')).train) == 3
    with pytest.raises(ConfigError):
        get_dataset('celeba', path=str(celeba_root), split='training')


def test_celeba_crop_geometry(celeba_root):
    data = get_dataset('celeba', path=str(celeba_root), split='test', random_flip=False)
    x = data.train[1]['x']  # 000006.png
    assert x.shape == (3, 64, 64)
    tol = 1 / 127.5  # one grey level of PIL's fixed-point resampling
    # The 16x16 red corner becomes 8x8 at half size; its inner 6x6 is untouched by the bilinear kernel.
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(x[:, :6, :6], red.expand(3, 6, 6), atol=tol)
    # Everything away from the red square is white: the crop took no black border row or column,
    # even at the last row/column (a crop off by one pixel would darken them).
    white = x.clone()
    white[:, :10, :10] = 1.0
    assert torch.allclose(white, torch.ones_like(white), atol=tol)
    # With flips on, the item is the same crop or its mirror (the red square then sits top-right).
    flipping = get_dataset('celeba', path=str(celeba_root), split='test', random_flip=True).train
    torch.manual_seed(0)
    seen = {tuple(_flip_pattern(flipping, [data.train[0]['x'], x])) for _ in range(10)}
    assert len(seen) > 1


def test_celeba_matches_torchvision_pipeline(celeba_root):
    # The original's transform: torchvision crop(top=57, left=25, 128, 128), then Resize(64) on the
    # PIL image, ToTensor, Normalize(0.5, 0.5).
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    data = get_dataset('celeba', path=str(celeba_root), random_flip=False)
    img = Image.open(celeba_root / 'img_align_celeba' / '000002.jpg').convert('RGB')
    ref = T.Normalize(0.5, 0.5)(T.ToTensor()(T.Resize(64)(TF.crop(img, 57, 25, 128, 128))))
    torch.testing.assert_close(data.train[1]['x'], ref, atol=1e-6, rtol=0)


def test_celeba_kaggle_csv_and_missing_split_list(tmp_path, celeba_root):
    img_dir = tmp_path / 'celeba' / 'img_align_celeba'  # torchvision's layout <path>/celeba/...
    img_dir.mkdir(parents=True)
    for name in ('000001.jpg', '000002.jpg'):
        (img_dir / name).write_bytes((celeba_root / 'img_align_celeba' / name).read_bytes())
    with pytest.raises(MissingFileError, match='list_eval_partition'):
        get_dataset('celeba', path=str(tmp_path))
    assert len(get_dataset('celeba', path=str(tmp_path), split='all').train) == 2
    (tmp_path / 'celeba' / 'list_eval_partition.csv').write_text('image_id,partition\n000001.jpg,0\n000002.jpg,2\n')
    assert len(get_dataset('celeba', path=str(tmp_path)).train) == 1


def test_celeba_small_image_is_data_error(tmp_path):
    (tmp_path / 'img_align_celeba').mkdir()
    Image.new('RGB', (64, 64)).save(tmp_path / 'img_align_celeba' / '000001.jpg')
    data = get_dataset('celeba', path=str(tmp_path), split='all')
    with pytest.raises(DataError, match='178x218'):
        data.train[0]


# ---------------------------------------------------------------- imagenet

SYNSETS = {'n02000001': 3, 'n01000001': 2, 'n03000001': 1}


def _ramp_image():
    """128x64 (W x H): red = 4 * (col // 4), green = 4 * (row // 4), blue = 0. Constant on 4x4
    blocks, so two exact BOX halvings leave pixel (i, j) = (4j, 4i, 0) of a 32x16 image."""
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, :, 0] = (np.arange(128) // 4 * 4)[None, :]
    arr[:, :, 1] = (np.arange(64) // 4 * 4)[:, None]
    return arr


@pytest.fixture(scope='module')
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet')
    rng = np.random.default_rng(0)
    for synset, count in SYNSETS.items():
        (root / 'train' / synset).mkdir(parents=True)
        for k in range(count):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / 'train' / synset / f'{synset}_{k}.JPEG', format='JPEG')
    return root


def test_imagenet_labels_shapes_and_kinds(imagenet_root):
    data = get_dataset('imagenet', path=str(imagenet_root), resolution=16, random_flip=False)
    assert len(data.train) == 6 and data.num_classes == 3
    assert data.classes == ['n01000001', 'n02000001', 'n03000001']
    assert data.data_shape == (3, 16, 16) and data.kind == 'pixels'
    for i in range(len(data.train)):
        item = data.train[i]
        synset = os.path.basename(data.train.path(i)).split('_')[0]
        assert int(item['y']) == sorted(SYNSETS).index(synset) and item['y'].dtype == torch.int64
        assert item['x'].shape == (3, 16, 16) and -1 <= item['x'].min() and item['x'].max() <= 1
    big = get_dataset('imagenet', path=str(imagenet_root / 'train'), resolution=256)
    assert big.kind == 'images_for_autoencoder' and big.data_shape == (4, 32, 32)
    assert big.image_shape == (3, 256, 256) and big.train[0]['x'].shape == (3, 256, 256)
    assert get_dataset('imagenet', path=str(imagenet_root), resolution=512).data_shape == (4, 64, 64)


def test_imagenet_rejects_other_layouts(tmp_path):
    _save(tmp_path / 'train' / 'n01000001' / 'n01000001_1.JPEG', fmt='JPEG')
    _save(tmp_path / 'train' / 'n01000001' / '0002.png')
    with pytest.raises(ConfigError, match='image_folder'):
        get_dataset('imagenet', path=str(tmp_path), resolution=16)


def test_imagenet_center_crop_geometry(tmp_path):
    (tmp_path / 'train' / 'n00000001').mkdir(parents=True)
    # PNG content under the ImageNet name: lossless, and PIL reads files by content.
    Image.fromarray(_ramp_image()).save(tmp_path / 'train' / 'n00000001' / 'n00000001_1.JPEG', format='PNG')
    x = get_dataset('imagenet', path=str(tmp_path), resolution=16, random_flip=False).train[0]['x']
    # 128x64 -> BOX 64x32 -> BOX 32x16 (16 < 2*16 stops), scale 1, centre crop columns 8..23, rows 0..15.
    cols = torch.arange(16, dtype=torch.float32)
    expected_red = (4 * (cols + 8)) / 127.5 - 1
    expected_green = (4 * cols) / 127.5 - 1
    torch.testing.assert_close(x[0], expected_red[None, :].expand(16, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[1], expected_green[:, None].expand(16, 16), atol=1e-6, rtol=0)
    assert torch.all(x[2] == -1)


def test_imagenet_random_crop_uses_torch_rng(tmp_path):
    (tmp_path / 'train' / 'n00000001').mkdir(parents=True)
    Image.fromarray(_ramp_image()).save(tmp_path / 'train' / 'n00000001' / 'n00000001_1.JPEG', format='PNG')
    data = get_dataset('imagenet', path=str(tmp_path), resolution=16, random_crop=True, random_flip=False)
    torch.manual_seed(5)
    a = [data.train[0]['x'] for _ in range(8)]
    torch.manual_seed(5)
    random.seed(99)
    b = [data.train[0]['x'] for _ in range(8)]
    assert all(x.shape == (3, 16, 16) and torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(a[0], x) for x in a[1:])  # the crops really vary


# ---------------------------------------------------------------- image_folder

def _save(path, size=(24, 20), seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def test_image_folder_with_classes(tmp_path):
    _save(tmp_path / 'zebra' / 'a.png', seed=1)
    _save(tmp_path / 'zebra' / 'deeper' / 'b.jpg', seed=2)
    _save(tmp_path / 'apple' / 'c.JPG', seed=3)
    (tmp_path / 'empty_class').mkdir()
    (tmp_path / 'zebra' / 'notes.txt').write_text('not an image')
    (tmp_path / 'zebra' / '._a.png').write_bytes(b'macOS resource fork, not an image')
    _save(tmp_path / '.hidden_class' / 'x.png')
    data = get_dataset('image_folder', path=str(tmp_path), resolution=16, random_flip=False)
    assert data.classes == ['apple', 'zebra'] and data.num_classes == 2
    assert len(data.train) == 3 and data.data_shape == (3, 16, 16) and data.kind == 'pixels'
    labels = {os.path.basename(data.train.path(i)): int(data.train[i]['y']) for i in range(len(data.train))}
    assert labels == {'c.JPG': 0, 'a.png': 1, 'b.jpg': 1}
    # Centre crop of a 24x20 image at 16: bicubic resize to 19x16 then columns 1..16 (ADM rule),
    # computed here with PIL directly.
    i = [data.train.path(k) for k in range(3)].index(str(tmp_path / 'zebra' / 'a.png'))
    ref = Image.open(tmp_path / 'zebra' / 'a.png').convert('RGB').resize((19, 16), Image.BICUBIC)
    ref = np.asarray(ref)[:, 1:17]
    torch.testing.assert_close(data.train[i]['x'], _to_unit(ref), atol=1e-6, rtol=0)


def test_image_folder_without_classes(tmp_path):
    for k in range(4):
        _save(tmp_path / f'{k}.png', size=(40, 30), seed=k)
    data = get_dataset('image_folder', path=str(tmp_path), resolution=8, random_crop=True)
    assert data.num_classes == 0 and data.classes == [] and len(data.train) == 4
    item = data.train[0]
    assert set(item) == {'x'} and item['x'].shape == (3, 8, 8)
    big = get_dataset('image_folder', path=str(tmp_path), resolution=256)
    with pytest.raises(ConfigError, match='config.fid.stat'):  # the key moved from config.dataset
        get_dataset('image_folder', path=str(tmp_path), resolution=256, fid_stat='my_stats.npz')
    assert big.kind == 'images_for_autoencoder' and big.data_shape == (4, 32, 32)
    assert get_dataset('image_folder', path=str(tmp_path), resolution=256, kind='pixels').data_shape == (3, 256, 256)


def test_image_folder_flips_half_reproducibly(tmp_path):
    for k in range(60):
        _save(tmp_path / f'{k:03d}.png', size=(8, 8), seed=k)
    plain = get_dataset('image_folder', path=str(tmp_path), resolution=8, random_flip=False).train
    flipping = get_dataset('image_folder', path=str(tmp_path), resolution=8, random_flip=True).train
    originals = [plain[i]['x'] for i in range(len(plain))]
    # Off by default: a mirrored digit or letter is another digit or letter (benchmarks/mnist_reference.py).
    assert not any(_flip_pattern(get_dataset('image_folder', path=str(tmp_path), resolution=8).train, originals))
    torch.manual_seed(0)
    first = _flip_pattern(flipping, originals)
    assert 0.25 < np.mean(first) < 0.75  # 60 fair coins: std 0.065, bounds ~4 std
    torch.manual_seed(0)
    assert _flip_pattern(flipping, originals) == first


def test_image_folder_bad_layouts(tmp_path):
    _save(tmp_path / 'mixed' / 'loose.png')
    _save(tmp_path / 'mixed' / 'cls' / 'inside.png')
    with pytest.raises(ConfigError, match='loose.png'):
        get_dataset('image_folder', path=str(tmp_path / 'mixed'), resolution=8)
    (tmp_path / 'a_file.txt').write_text('x')
    with pytest.raises(ConfigError):
        get_dataset('image_folder', path=str(tmp_path / 'a_file.txt'), resolution=8)
    with pytest.raises(ConfigError):
        get_dataset('image_folder', path=str(tmp_path / 'mixed' / 'cls'), resolution=0)
    with pytest.raises(ConfigError):
        get_dataset('image_folder', path=str(tmp_path / 'mixed' / 'cls'), resolution=100, kind='images_for_autoencoder')
    (tmp_path / 'corrupt').mkdir()
    (tmp_path / 'corrupt' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    data = get_dataset('image_folder', path=str(tmp_path / 'corrupt'), resolution=8)
    with pytest.raises(DataError, match='broken.jpg'):
        data.train[0]
