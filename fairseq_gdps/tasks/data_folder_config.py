"""The data folder's config.yaml as speech_to_text_gdps reads it: fairseq's S2TDataConfig, with
``audio_root`` resolved against the data folder when it names no existing folder.

Stock fairseq joins the manifests' audio paths to ``audio_root`` as it stands, so a data folder
that was moved or renamed (its config.yaml still naming the old place) no longer loads. The plugin's
task needs no absolute path: it reads the audio from the folder that holds config.yaml instead
(``resolve_audio_root``), and says so once.
"""
import logging
from pathlib import Path

from fairseq.data.audio.data_cfg import S2TDataConfig

from fairseq_gdps.data.manifest import existing_audio_root, resolve_audio_root

logger = logging.getLogger(__name__)


class DataFolderConfig(S2TDataConfig):
    def __init__(self, yaml_path: Path):
        super().__init__(yaml_path)
        stored = self.config.get("audio_root", "")
        self._audio_root = resolve_audio_root(stored, self.root.as_posix())
        if existing_audio_root(stored, self.root.as_posix()) is None:
            logger.warning(f"{yaml_path}: audio_root {stored} is not a folder (the data folder was moved?): "
                           f"reading the manifests' audio from {self._audio_root}; stock fairseq "
                           "(--task speech_to_text) needs `gdps-prep --out DATA --relocate` first")

    @property
    def audio_root(self):
        return self._audio_root
