"""`hf://org/name[@revision]`: a Hugging Face Hub repository as a checkpoint location."""

from __future__ import annotations

from pathlib import Path

from pipeline.weights.errors import CheckpointError

HUB_SCHEME = "hf://"


def hub_snapshot(uri: str) -> Path:
    """`hf://org/name[@revision]` -> the local directory of that Hugging Face Hub repository,
    through `huggingface_hub`'s cache (HF_HOME / HF_HUB_CACHE): downloaded once, then read
    from the cache; with HF_HUB_OFFLINE=1 only the cache is used."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    name, _, revision = uri[len(HUB_SCHEME):].partition("@")
    try:
        return Path(snapshot_download(name, revision=revision or None, allow_patterns=[
            "*.json", "*.safetensors", "pytorch_model.bin"]))
    except HFValidationError as err:
        raise CheckpointError(f"{uri}: not a Hugging Face Hub name (org/name[@revision]): "
                              f"{str(err).splitlines()[0]}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{uri}: not in the Hugging Face cache and the Hub cannot be "
                              f"reached (HF_HUB_OFFLINE or no network); download it where "
                              f"there is network, or point HF_HUB_CACHE at a filled cache"
                              ) from None
    except Exception as err:  # noqa: BLE001 - repository not found, auth, network: one line
        raise CheckpointError(f"{uri}: cannot fetch from the Hugging Face Hub: "
                              f"{str(err).splitlines()[0][:200]}") from None
