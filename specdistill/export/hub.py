"""`specdistill publish`: ship an export directory to a model hub, or to a local ready repository.

    specdistill publish <export dir> --repo-id org/name [--private] [--revision R] [--dry-run] [--force]
    specdistill publish <export dir> --to <dir> [--repo-id org/name] [--force]

The repository holds the export's files (config.json, *.safetensors, specdistill_export.json,
eval.json, ...) plus a generated README.md model card (export/card.py). An export without
eval.json is refused unless --force: a drafter nobody measured should not look published.

The token comes from HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) or the `hf auth login` store, is
passed only to HfApi and is never printed; error messages from the hub are scrubbed of it.
`--dry-run` lists exactly the files and sizes that would be uploaded and contacts nothing.
`--to` writes the same repository into a local directory atomically (air-gapped hubs, review).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from specdistill import fsutil
from specdistill.export import card as card_mod
from specdistill.export import common

log = logging.getLogger(__name__)

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
WEIGHT_SUFFIXES = (".safetensors",)
# Never shipped: editor/OS litter, partial writes, and our own temp dirs.
_SKIP = re.compile(r"(^\.|\.tmp\d*$|~$|^__pycache__$)")
MARKER = ".specdistill_publish.json"  # written by `publish --to`: the files it wrote there


class PublishError(ValueError):
    """The export cannot be published as asked; the message says why and what to do."""


def repo_files(export_dir: Path) -> list[tuple[Path, Path]]:
    """(relative path in the repository, file to copy) for every export file that ships (README.md is
    regenerated). Nothing outside the export ships: a symlink to a file inside the export is copied as that
    file (with a warning); a symlink leading outside it, to a directory, or nowhere is refused."""
    root = export_dir.resolve()
    files = []
    for dirpath, dirs, names in os.walk(export_dir):
        here = Path(dirpath)
        dirs[:] = sorted(d for d in dirs if not _SKIP.search(d))
        for name in [*dirs, *names]:
            p = here / name
            rel = p.relative_to(export_dir)
            if _SKIP.search(name) or rel.as_posix() == "README.md":
                continue
            if p.is_symlink():
                real = p.resolve()
                if not real.is_relative_to(root) or not real.is_file():
                    what = "a directory" if real.is_dir() else "nothing" if not real.exists() else "a file"
                    where = "inside" if real.is_relative_to(root) else "outside"
                    raise PublishError(f"{p}: symlink to {what} {where} the export ({real}); only files of the "
                                       "export are published: replace the link by the file itself")
                log.warning("%s: symlink; publishing a copy of %s", p, real.relative_to(root))
                files.append((rel, real))
            elif p.is_file():
                files.append((rel, p))
    return sorted(files)


def check_export(export_dir: Path, force: bool) -> None:
    if not export_dir.is_dir():
        raise PublishError(f"{export_dir}: export directory not found")
    if not (export_dir / "config.json").exists():
        raise PublishError(f"{export_dir}: no config.json; is this an export directory "
                           "(<train.output_dir>/export/<format>/)?")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in export_dir.iterdir()):
        raise PublishError(f"{export_dir}: no *.safetensors weights")
    if common.eval_is_stale(export_dir) and not force:
        raise PublishError(
            f"{export_dir / 'eval.json'}: measured the weights this export held before it was re-exported. "
            f"Measure it again (`specdistill eval --drafter {export_dir}`), or pass --force."
        )
    if not (export_dir / "eval.json").exists() and not force:
        raise PublishError(
            f"{export_dir}: no eval.json. Measure the drafter first (`specdistill eval {export_dir}` writes it "
            "there), or pass --force to publish it unmeasured (the card will say so)."
        )


def stage(export_dir: Path, repo_id: str, dest: Path) -> list[tuple[str, int]]:
    """Copy the export files and write README.md into `dest`; return [(path, bytes)] in upload order."""
    readme = card_mod.build_card(export_dir, repo_id)
    dest.mkdir(parents=True, exist_ok=True)
    listing = []
    for rel, src in repo_files(export_dir):
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
        listing.append((rel.as_posix(), out.stat().st_size))
    (dest / "README.md").write_text(readme)
    listing.append(("README.md", (dest / "README.md").stat().st_size))
    return sorted(listing)


def _published_by_us(to: Path) -> list[str] | None:
    """The files an earlier `publish --to` wrote into `to` (its MARKER), or None if it did not write it."""
    try:
        data = json.loads((to / MARKER).read_text())
        return [str(f) for f in data["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_destination(export_dir: Path, to: Path, force: bool) -> None:
    """`--to` must be absent, an empty directory, or (with --force) what an earlier publish wrote, unchanged
    since: publish never deletes what it did not create."""
    if to.is_symlink():
        raise PublishError(f"--to {to}: is a symlink; give the real directory")
    if to.exists() and not to.is_dir():
        raise PublishError(f"--to {to}: exists and is not a directory")
    dest, exp = to.resolve(), export_dir.resolve()
    if dest == exp or dest.is_relative_to(exp):
        raise PublishError(f"--to {to}: must not be the export directory or inside it")
    if exp.is_relative_to(dest):
        raise PublishError(f"--to {to}: contains the export {export_dir}; give a new or empty directory")
    run = card_mod.run_dir_of(export_dir, {})
    if run is not None and run.resolve().is_relative_to(dest):
        raise PublishError(f"--to {to}: contains the training run {run}; give a new or empty directory")
    if not to.exists() or not any(to.iterdir()):
        return
    ours = _published_by_us(to)
    if ours is None:
        raise PublishError(f"--to {to}: exists and is not empty, and is not a repository `specdistill publish` "
                           "wrote; give a new or empty directory (publish only replaces its own output)")
    extra = sorted(p.relative_to(to).as_posix() for p in to.rglob("*")
                   if not p.is_dir() and p.relative_to(to).as_posix() not in {*ours, MARKER})
    if extra:
        raise PublishError(f"--to {to}: holds files an earlier publish did not write ({', '.join(extra[:5])}"
                           f"{', ...' if len(extra) > 5 else ''}); move them away or give another directory")
    if not force:
        raise PublishError(f"--to {to}: exists and is not empty (an earlier publish); pass --force to replace it")


def write_local(export_dir: Path, to: Path, repo_id: str, force: bool) -> list[tuple[str, int]]:
    """Write the ready repository to `to` atomically: temp sibling, then rename into place (see
    common.atomic_dir); a MARKER file records what was written, so a later --force may replace it."""
    to = to.expanduser()
    check_destination(export_dir, to, force)

    def fill(tmp: Path) -> list[tuple[str, int]]:
        listing = stage(export_dir, repo_id, tmp)
        fsutil.atomic_write_text(tmp / MARKER, json.dumps(
            {"source": str(export_dir.resolve()), "repo_id": repo_id, "files": [n for n, _ in listing]}, indent=1))
        return listing

    return common.atomic_dir(to, fill)


def get_token() -> str | None:
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        v = os.environ.get(k, "").strip()
        if v:
            return v
    try:
        from huggingface_hub import get_token as hf_get_token

        return hf_get_token()
    except Exception:  # no login store, unreadable file: same as no token
        return None


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)


def upload(export_dir: Path, repo_id: str, private: bool, revision: str | None,
           commit_message: str | None = None) -> str:
    """create_repo + upload_folder; returns the commit URL."""
    from huggingface_hub import HfApi

    token = get_token()
    if not token:
        raise PublishError("no hub token: set HF_TOKEN in the environment or run `hf auth login` "
                           "(or use --dry-run / --to <dir>)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="specdistill-publish-") as tmp:
            stage(export_dir, repo_id, Path(tmp))
            info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=tmp, revision=revision,
                                     commit_message=commit_message or f"specdistill: publish {export_dir.name} export")
    except PublishError:
        raise
    except Exception as e:  # hub/network errors: keep the message, never the token
        raise PublishError(_scrub(f"upload to {repo_id} failed: {e.__class__.__name__}: {e}", token)) from None
    return str(getattr(info, "commit_url", None) or info)


def _print_listing(listing: list[tuple[str, int]], header: str) -> None:
    from specdistill.plan import human

    print(header)
    w = max(len(n) for n, _ in listing)
    for name, size in listing:
        print(f"  {name:<{w}}  {size:>14,d} B  ({human(size)})")
    total = sum(s for _, s in listing)
    print(f"  {'total':<{w}}  {total:>14,d} B  ({human(total)}) in {len(listing)} files")


def publish(export_dir: str | Path, repo_id: str | None = None, to: str | Path | None = None,
            private: bool = False, revision: str | None = None, dry_run: bool = False, force: bool = False,
            commit_message: str | None = None) -> dict:
    export_dir = Path(export_dir).expanduser()
    if repo_id is not None and not REPO_ID_RE.match(repo_id):
        raise PublishError(f"--repo-id {repo_id!r}: expected org/name (letters, digits, '-', '_', '.')")
    if to is None and repo_id is None:
        raise PublishError("give --repo-id org/name (upload) or --to <dir> (local repository)")
    check_export(export_dir, force)
    card_repo = repo_id or f"<org>/{Path(to).name}"
    if dry_run:
        if to is not None:
            check_destination(export_dir, Path(to).expanduser(), force)
        with tempfile.TemporaryDirectory(prefix="specdistill-dryrun-") as tmp:
            listing = stage(export_dir, card_repo, Path(tmp))
        where = f"{repo_id}" + (f" (revision {revision})" if revision else "") + (" [private]" if private else "") \
            if to is None else str(to)
        _print_listing(listing, f"dry run: would upload to {where}:")
        return {"dry_run": True, "files": listing}
    if to is not None:
        listing = write_local(export_dir, Path(to), card_repo, force)
        _print_listing(listing, f"wrote repository {to}:")
        return {"to": str(to), "files": listing}
    url = upload(export_dir, repo_id, private, revision, commit_message)
    print(f"published {export_dir} to {repo_id}" + (f" (revision {revision})" if revision else "") + f": {url}")
    return {"repo_id": repo_id, "url": url}


def cmd_publish(args) -> None:
    try:
        publish(args.export_dir, repo_id=args.repo_id, to=args.to, private=args.private, revision=args.revision,
                dry_run=args.dry_run, force=args.force, commit_message=args.message)
    except PublishError as e:
        raise SystemExit(f"specdistill publish: error: {e}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("publish", help="upload an export + model card to a hub, or write it to --to <dir>",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", help="an export directory (<train.output_dir>/export/<format>/)")
    p.add_argument("--repo-id", help="hub repository, org/name")
    p.add_argument("--to", help="write the ready repository to this local directory instead of uploading")
    p.add_argument("--private", action="store_true", help="create the hub repository as private")
    p.add_argument("--revision", help="branch to upload to (created if missing)")
    p.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded")
    p.add_argument("--force", action="store_true", help="publish without eval.json / replace a non-empty --to")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_publish)
