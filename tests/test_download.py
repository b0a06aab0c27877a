"""tools/download.py without a network: the name table against the release's links and the configs, and
every fetch against a local stand-in for Google Drive (an HTTP server honouring Range requests, and a
folder listing): --all, the folder mode, an error page, a resumed partial file, a size mismatch, a typo,
and the Hub mirror."""
import collections
import hashlib
import http.server
import importlib
import json
import os
import subprocess
import sys
import threading

import gdown
import pytest

from libs.errors import CheckpointError, ConfigError, MissingFileError
from tools import download as dl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = ['cifar10_uvit_small', 'celeba64_uvit_small', 'imagenet64_uvit_mid', 'imagenet64_uvit_large',
                 'imagenet256_uvit_large', 'imagenet256_uvit_huge', 'imagenet512_uvit_large', 'imagenet512_uvit_huge',
                 'mscoco_uvit_small']
ERROR_PAGE = b'\n<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>'
Entry = collections.namedtuple('Entry', 'id path local_path')  # what gdown's folder listing returns


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'download.py'), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


class StandIn(http.server.BaseHTTPRequestHandler):
    """Serves `files` {drive id: bytes} at /uc?id=<id>, honouring `Range: bytes=N-` as Drive does."""
    files, seen = {}, []

    def do_GET(self):
        file_id = self.path.split('id=', 1)[-1]
        self.seen.append((file_id, self.headers.get('Range')))
        body = self.files.get(file_id)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers['Range'].split('=')[1].split('-')[0]) if self.headers.get('Range') else 0
        self.send_response(206 if start else 200)
        self.send_header('Content-Type', 'text/html' if body.startswith(b'\n<!DOCTYPE') else 'application/octet-stream')
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        self.send_header('Content-Length', str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def drive(monkeypatch):
    """The stand-in: .files (id -> bytes), .seen ((id, Range) per request), .folder (name -> id, the
    shared folder's listing) and .listed (how often it was listed)."""
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), type('H', (StandIn,), {'files': {}, 'seen': []}))
    threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
    handler = server.RequestHandlerClass
    handler.folder, handler.listed = {}, []

    def listing(url, skip_download, quiet):
        assert skip_download is True  # a listing, never gdown's bulk folder download
        handler.listed.append(url)
        return [Entry(i, f'fid_stats/{name}', None) for name, i in handler.folder.items()]

    monkeypatch.setattr(dl, 'DRIVE_FILE_URL', f'http://127.0.0.1:{server.server_port}/uc?id={{id}}')
    monkeypatch.setattr(gdown, 'download_folder', listing)
    yield handler
    server.shutdown()
    server.server_close()


def payload(name):
    return f'{name}: pretend weights '.encode() * 50


def serve_all(drive):
    for f in dl.FILES:
        if f.drive_id is None:
            drive.folder[os.path.basename(f.target)] = f'1Folder_{f.name}'
        drive.files[f.drive_id or f'1Folder_{f.name}'] = payload(f.name)


def test_the_table_holds_every_id_of_the_release(reference_dir):
    with open(os.path.join(reference_dir, 'release_links.json')) as f:
        links = json.load(f)
    ours = {f.name: f.drive_id for f in dl.FILES if f.drive_id is not None}
    assert ours == links['checkpoint_file_ids']
    assert dl.FOLDER_ID == links['folder_id']
    in_folder = [f.target for f in dl.FILES if f.drive_id is None]  # the autoencoders and the FID statistics
    assert len(in_folder) == 8
    assert {os.path.dirname(t) for t in in_folder} == set(links['folder_subfolders'].values())


def test_names_and_targets_are_unique_and_under_assets():
    names = [f.name for f in dl.FILES]
    targets = [f.target for f in dl.FILES]
    assert len(set(names)) == len(names) == 18
    assert len(set(targets)) == len(targets)
    for f in dl.FILES:
        assert f.target.startswith('assets/') and '..' not in f.target.split('/') and f.what
        assert os.path.splitext(os.path.basename(f.target))[0] == f.name
        assert f.hub_file == f.target[len('assets/'):]


def test_checkpoints_are_the_published_ones(reference_dir):
    with open(os.path.join(reference_dir, 'uvit_checkpoints.json')) as f:
        published = {name: c['published_checkpoint'] for name, c in json.load(f)['configs'].items()}
    ours = {f.name: os.path.basename(f.target) for f in dl.FILES if f.target.startswith(dl.CHECKPOINT_DIR + '/')}
    assert ours == published


def test_every_autoencoder_and_fid_statistics_path_is_covered(reference_dir):
    targets = {f.target for f in dl.FILES}
    with open(os.path.join(reference_dir, 'release_configs.json')) as f:
        rows = json.load(f)['data']
    # The release's table: "assets/fid_stats/x.npz (resolution 64)" or "—" for pixel-space autoencoders.
    wanted = {row['FID reference stats'].split()[0] for row in rows}
    wanted |= {row['autoencoder'] for row in rows if row['autoencoder'].startswith('assets/')}
    assert len(wanted) == 8
    for name in PAPER_CONFIGS:  # and this repository's configs, which may have grown keys since the release
        config = importlib.import_module(f'configs.{name}').get_config()
        if config.autoencoder.pretrained_path:
            wanted.add(config.autoencoder.pretrained_path)
    assert wanted <= targets


def test_help_exits_0_and_a_typo_is_one_line():
    out = run_tool('--help')
    assert out.returncode == 0 and 'Traceback' not in out.stderr
    for f in dl.FILES:
        assert f.name in out.stdout and f.target in out.stdout
    assert '--all' in out.stdout and '--hub_repo' in out.stdout
    out = run_tool('imagenet256_uvit_hug', 'autoencoder_kl')
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "unknown name 'imagenet256_uvit_hug': did you mean imagenet256_uvit_huge?" in lines[0]


def test_all_fetches_every_file_by_name_and_lists_the_folder_once(tmp_path, drive):
    serve_all(drive)
    paths = dl.download(everything=True, root=str(tmp_path))
    assert paths == [str(tmp_path / f.target) for f in dl.FILES]
    for f in dl.FILES:
        assert (tmp_path / f.target).read_bytes() == payload(f.name)
    assert drive.listed == [dl.DRIVE_FOLDER_URL.format(id=dl.FOLDER_ID)]
    assert sorted(i for i, _ in drive.seen) == sorted(drive.files)  # each file once, by its own id
    assert sorted(p.name for p in (tmp_path / 'assets' / 'ckpts').iterdir()) == sorted(
        f'{f.name}.pth' for f in dl.FILES if f.drive_id)  # no temporary left behind
    # Everything present: no request at all, not even the listing.
    drive.seen.clear()
    dl.download(everything=True, root=str(tmp_path))
    assert drive.seen == [] and len(drive.listed) == 1


def test_folder_mode_fetches_a_named_file_from_the_listing(tmp_path, drive):
    drive.folder['fid_stats_cifar10_train_pytorch.npz'] = '1Cifar'
    drive.files['1Cifar'] = payload('cifar')
    [path] = dl.download(['fid_stats_cifar10_train_pytorch'], root=str(tmp_path))
    assert path == str(tmp_path / 'assets/fid_stats/fid_stats_cifar10_train_pytorch.npz')
    assert open(path, 'rb').read() == payload('cifar') and [i for i, _ in drive.seen] == ['1Cifar']
    # A file the listing lacks: one line saying where to put it by hand.
    with pytest.raises(MissingFileError) as e:
        dl.download(['autoencoder_kl_ema'], root=str(tmp_path))
    assert '\n' not in str(e.value) and 'not in the release' in str(e.value)
    assert 'assets/stable-diffusion/autoencoder_kl_ema.pth' in str(e.value)


def test_an_error_page_leaves_nothing(tmp_path, drive):
    drive.files['13StUdrjaaSXjfqqF7M47BzPyhMAArQ4u'] = ERROR_PAGE
    with pytest.raises(CheckpointError) as e:
        dl.download(['imagenet256_uvit_huge'], root=str(tmp_path))
    msg = str(e.value)
    assert '\n' not in msg and 'web page' in msg and 'assets/ckpts/imagenet256_uvit_huge.pth' in msg
    assert os.listdir(tmp_path / 'assets' / 'ckpts') == []


def test_a_partial_file_is_resumed(tmp_path, drive):
    data = payload('cifar10_uvit_small')
    drive.files['1yoYyuzR_hQYWU0mkTj659tMTnoCWCMv-'] = data
    folder = tmp_path / 'assets' / 'ckpts'
    folder.mkdir(parents=True)
    # What an interrupted gdown leaves beside its output: <output><8 characters>.part
    (folder / 'cifar10_uvit_small.pth.unverifiedAbCd1234.part').write_bytes(data[:300])
    dl.download(['cifar10_uvit_small'], root=str(tmp_path))
    assert (folder / 'cifar10_uvit_small.pth').read_bytes() == data
    assert drive.seen[-1] == ('1yoYyuzR_hQYWU0mkTj659tMTnoCWCMv-', 'bytes=300-')  # the rest was asked for
    assert os.listdir(folder) == ['cifar10_uvit_small.pth']


@pytest.mark.parametrize('served,match', [(b'x' * 99, 'got 99 bytes, the release.s file has 100'),
                                          (b'y' * 100, 'sha256 differs')])
def test_a_size_or_checksum_mismatch_leaves_nothing(tmp_path, drive, served, match):
    good = b'x' * 100
    drive.files['1Fake'] = served
    file = dl.ReleaseFile('tiny', 'assets/ckpts/tiny.pth', 'a test file', '1Fake', len(good),
                          hashlib.sha256(good).hexdigest())
    with pytest.raises(CheckpointError, match=match) as e:
        dl.fetch(file, file.drive_id, root=str(tmp_path))
    assert '\n' not in str(e.value) and 'assets/ckpts/tiny.pth' in str(e.value)
    assert os.listdir(tmp_path / 'assets' / 'ckpts') == []


def test_unreachable_drive_is_one_line(tmp_path, drive, monkeypatch):
    monkeypatch.setattr(dl, 'DRIVE_FILE_URL', 'http://127.0.0.1:9/uc?id={id}')  # nothing listens on port 9

    def offline(**kwargs):
        raise gdown.exceptions.FileURLRetrievalError("Failed to retrieve folder contents:\n\n\tToo many users")

    monkeypatch.setattr(gdown, 'download_folder', offline)
    with pytest.raises(MissingFileError, match='cannot reach Google Drive') as e:
        dl.download(['celeba64_uvit_small'], root=str(tmp_path))
    assert '\n' not in str(e.value) and 'github.com/baofff/U-ViT' in str(e.value)
    with pytest.raises(MissingFileError, match='refused the folder .*Failed to retrieve folder contents:') as e:
        dl.download(['autoencoder_kl', 'fid_stats_mscoco256_val'], root=str(tmp_path))
    assert '\n' not in str(e.value) and 'autoencoder_kl.pth, fid_stats_mscoco256_val.npz' in str(e.value)


def test_the_hub_mirror_serves_where_drive_refuses(tmp_path, drive, monkeypatch):
    import huggingface_hub

    drive.files['1yoYyuzR_hQYWU0mkTj659tMTnoCWCMv-'] = ERROR_PAGE
    calls = []

    def hub_stand_in(repo_id, filename, revision, local_dir):
        calls.append((repo_id, filename, revision))
        path = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(payload('mirror'))
        return path

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', hub_stand_in)
    hub = dl.hub_of('someone/uvit-release', 'a' * 40)
    dl.download(['cifar10_uvit_small'], root=str(tmp_path), hub=hub)
    assert (tmp_path / 'assets/ckpts/cifar10_uvit_small.pth').read_bytes() == payload('mirror')
    assert calls == [('someone/uvit-release', 'ckpts/cifar10_uvit_small.pth', 'a' * 40)]
    assert os.listdir(tmp_path / 'assets' / 'ckpts') == ['cifar10_uvit_small.pth']
    for repo, revision in (('someone/uvit-release', 'main'), ('someone/uvit-release', None), (None, 'a' * 40)):
        with pytest.raises(ConfigError, match='--hub_re'):
            dl.hub_of(repo, revision)


def test_command_line_mistakes():
    with pytest.raises(ConfigError, match='--all'):
        dl.download([])
    with pytest.raises(ConfigError, match='--all'):
        dl.download(['autoencoder_kl'], everything=True)
    with pytest.raises(ConfigError, match="'cifar_uvit': did you mean cifar10_uvit_small.*; unknown name 'zzz'"):
        dl.download(['cifar_uvit', 'zzz'])


def test_every_file_that_cannot_be_fetched_is_named_with_its_folder(tmp_path, drive, monkeypatch, caplog):
    monkeypatch.setattr(dl, 'DRIVE_FILE_URL', 'http://127.0.0.1:9/uc?id={id}')  # nothing listens on port 9
    drive.folder['fid_stats_cifar10_train_pytorch.npz'] = '1Cifar'  # listed, but Drive cannot be reached
    with pytest.raises(MissingFileError) as e:
        dl.download(['celeba64_uvit_small', 'fid_stats_cifar10_train_pytorch', 'autoencoder_kl'], root=str(tmp_path))
    assert str(e.value) == (
        "3 of 3 files could not be fetched (the reasons are above): celeba64_uvit_small (to assets/ckpts/), "
        "fid_stats_cifar10_train_pytorch (to assets/fid_stats/), autoencoder_kl (to assets/stable-diffusion/)")
    errors = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert len(errors) == 3 and all('\n' not in m for m in errors)
    assert 'put it at assets/stable-diffusion/autoencoder_kl.pth' in errors[2]


def test_a_failed_listing_names_one_folder_per_file(tmp_path, drive, monkeypatch):
    def offline(**kwargs):
        raise gdown.exceptions.FileURLRetrievalError("Failed to retrieve folder contents")

    monkeypatch.setattr(gdown, 'download_folder', offline)
    with pytest.raises(MissingFileError) as e:
        dl.download(['autoencoder_kl', 'fid_stats_mscoco256_val'], root=str(tmp_path))
    assert str(e.value).endswith("by hand (autoencoder_kl.pth into assets/stable-diffusion/; "
                                 "fid_stats_mscoco256_val.npz into assets/fid_stats/)")
