"""xm_transformer_gdps: a (tiny, randomly initialised) wav2vec 2.0 encoder read from --w2v-path, on
raw waveforms; GDPS probe statistics for its FFNs, a function-preserving split of one of them,
and --gdps-train-only with fairseq-train (frozen parameters unchanged, trained ones changed)."""
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import BIN, REPO, run
from fairseq import checkpoint_utils, models
from fairseq.data import Dictionary
from fairseq.data.audio.audio_utils import get_features_or_waveform
from fairseq.dataclass.configs import FairseqConfig
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig

from fairseq_gdps.cli.export import ExportError, export_checkpoint, main as export_main
from fairseq_gdps.data.manifest import read_manifest
from fairseq_gdps.data.waveform_data import WAVEFORM_ZIP, prepare_waveform_data
from fairseq_gdps.gdps.stats import GradientStatistics
from fairseq_gdps.models import ffn_module_names, partitioned_ffns, split_ffns

W2V = "encoder.w2v_encoder.w2v_model"
W2V_FFNS = [f"{W2V}.encoder.layers.0.ffn", f"{W2V}.encoder.layers.1.ffn"]
LANGS = ["ar", "et", "ga", "sw"]  # the tiny corpus's languages (task ids in this order)
MODEL_SIZES = dict(decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64, decoder_attention_heads=2,
                   adaptor_n_layers=1)


def write_tiny_w2v_checkpoint(path: Path, seed: int = 0) -> dict:
    """A randomly initialised wav2vec 2.0 pretraining checkpoint as fairseq writes one (cfg with
    model and task, model state with the quantizer): 2 layers, width 32, FFN 64, a 3-layer conv
    feature extractor of stride 80 (5 ms frames). Returns its model state."""
    torch.manual_seed(seed)
    model_cfg = Wav2Vec2Config(
        encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
        conv_feature_layers="[(16, 10, 5), (16, 8, 4), (16, 4, 4)]", conv_pos=8, conv_pos_groups=4,
        final_dim=16, latent_vars=8, latent_groups=2, latent_temp=(2.0, 0.5, 0.999995),
    )
    model = Wav2Vec2Model(model_cfg)
    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.model = OmegaConf.structured(model_cfg)
        cfg.model._name = "wav2vec2"
        cfg.task = OmegaConf.structured(AudioPretrainingConfig(data="."))
        cfg.task._name = "audio_pretraining"
    state = {"cfg": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True), "args": None,
             "model": model.state_dict(), "criterion": None, "last_optimizer_state": None,
             "optimizer_history": [{"criterion_name": "wav2vec", "optimizer_name": "adam",
                                    "lr_scheduler_state": {}, "num_updates": 0}],
             "extra_state": {"train_iterator": {"epoch": 1}}}
    torch.save(state, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    path = tmp_path_factory.mktemp("w2v") / "tiny_w2v.pt"
    return path, write_tiny_w2v_checkpoint(path)


@pytest.fixture(scope="module")
def wave_data(tiny_data, tiny_corpus):
    out = tiny_data.parent / "wave_data"
    if not (out / "config.yaml").is_file():
        prepare_waveform_data(str(tiny_data), str(tiny_corpus), str(out))
    return out


class Task:
    """What build_model reads of speech_to_text_gdps: the target dictionary and the language ids."""

    def __init__(self, data: Path):
        self.target_dictionary = Dictionary.load(str(data / "spm_unigram64.txt"))
        self.source_dictionary = None
        self.multitask_tasks = {}
        self.languages = LANGS


def build(w2v_path, data, **extra):
    torch.manual_seed(1)
    args = Namespace(arch="xm_transformer_gdps", w2v_path=str(w2v_path), data=str(data),
                     max_source_positions=400000, max_target_positions=100, **MODEL_SIZES, **extra)
    return models.build_model(args, Task(data)), args


def real_batch(data: Path, n_per_lang=1, split="dev"):
    """Waveforms of real utterances (one per language), read as the S2T dataset reads them."""
    rows = read_manifest(str(data / f"{split}.tsv"))
    chosen = [next(r for r in rows if r["src_lang"] == lang) for lang in LANGS for _ in range(n_per_lang)]
    waves = [torch.from_numpy(get_features_or_waveform(str(data / r["audio"]), need_waveform=True)).float()
             for r in chosen]
    lengths = torch.tensor([len(w) for w in waves])
    src = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        src[i, : len(w)] = w
    g = torch.Generator().manual_seed(2)
    return {"src_tokens": src, "src_lengths": lengths,
            "prev_output_tokens": torch.randint(4, len(Task(data).target_dictionary), (len(waves), 6), generator=g),
            "src_lang_id": torch.tensor([LANGS.index(r["src_lang"]) for r in chosen])}


# ------------------------------------------------------------------------------------- data
def test_fairseq_reads_no_wav_without_torchaudio_but_reads_waveform_npy_in_zip(wave_data, tiny_corpus, tmp_path):
    """Why the waveform folder stores .npy in a zip: pins fairseq-fixed's behaviour here."""
    sf = pytest.importorskip("soundfile")
    try:
        import torchaudio  # noqa: F401
        pytest.skip("torchaudio is installed: fairseq can read .wav manifest entries directly")
    except ImportError:
        pass
    row = read_manifest(str(tiny_corpus / "train.tsv"))[0]
    wav_path = tiny_corpus / row["audio"]
    with pytest.raises(ImportError, match="torchaudio"):
        get_features_or_waveform(str(wav_path), need_waveform=True)

    expected, rate = sf.read(str(wav_path), dtype="float32")
    entry = next(r for r in read_manifest(str(wave_data / "train.tsv")) if r["id"] == row["id"])
    assert entry["audio"].startswith(f"{WAVEFORM_ZIP}:") and int(entry["n_frames"]) == len(expected)
    got = get_features_or_waveform(str(wave_data / entry["audio"]), need_waveform=True)
    assert rate == 16000 and got.dtype == np.float32 and np.array_equal(got, expected)
    with zipfile.ZipFile(wave_data / WAVEFORM_ZIP) as zf:  # uncompressed, as fairseq needs
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    config = (wave_data / "config.yaml").read_text()
    assert "use_audio_input: true" in config and "feature_transforms" not in config


def test_waveform_folder_names_the_manifest_line_of_a_missing_utterance(tiny_data, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.tsv").write_text("id\taudio\nnot_there\twav/x.wav\n")
    with pytest.raises(ValueError, match=r"data/dev\.tsv:2: utterance '\w+' is in no TSV of --corpus"):
        prepare_waveform_data(str(tiny_data), str(corpus), str(tmp_path / "out"))


# ------------------------------------------------------------------------------------ model
def test_builds_on_the_pretrained_encoder_with_named_ffns(w2v, wave_data, one_thread):
    path, w2v_state = w2v
    model, args = build(path, wave_data)
    assert args.encoder_embed_dim == 32  # read from the checkpoint (the stock default is 1024)
    state = model.state_dict()
    for key in ("encoder.layers.1.fc1.weight", "feature_extractor.conv_layers.0.0.weight",
                "encoder.pos_conv.0.weight_v", "layer_norm.weight"):
        assert torch.equal(state[f"{W2V}.{key}"], w2v_state[key]), key  # pretrained weights loaded
    assert list(ffn_module_names(model)) == W2V_FFNS + ["decoder.layers.0.ffn", "decoder.layers.1.ffn"]


def test_w2v_freezing_updates_is_refused_with_the_freezing_flags(w2v, wave_data, one_thread):
    with pytest.raises(ValueError, match="--w2v-freezing-updates .* undoing --gdps-train-only"):
        build(w2v[0], wave_data, w2v_freezing_updates=10, gdps_freeze="decoder.*")


def test_language_embedding_is_refused(w2v, wave_data, one_thread):
    """--gdps-lang-embedding is for the S2T encoders (their input before the first layer) only."""
    with pytest.raises(ValueError, match="--gdps-lang-embedding is supported by s2t_transformer_gdps.* only"):
        build(w2v[0], wave_data, gdps_lang_embedding=True)


def test_split_of_a_wav2vec2_ffn_preserves_the_function(w2v, wave_data, one_thread):
    model, _ = build(w2v[0], wave_data, gdps_groups="ar,et;ga,sw")
    model.eval()
    batch = real_batch(wave_data)
    # trained-looking weights: perturb the FFN so that the energy ranking is not the identity
    fc1 = model.get_submodule(f"{W2V}.encoder.layers.1.fc1")
    with torch.no_grad():
        fc1.weight.mul_(torch.linspace(0.5, 2.0, fc1.weight.shape[0]).unsqueeze(1))
        before, _ = model(**batch)
    split_ffns(model, [W2V_FFNS[1]], n_groups=2, shared_ratio=0.5)
    assert list(partitioned_ffns(model)) == [W2V_FFNS[1]]
    with torch.no_grad():
        after, _ = model(**batch)
    assert before.shape == after.shape and (after - before).abs().max().item() < 1e-5
    # the groups' private blocks then diverge: the routing is real
    ffn = partitioned_ffns(model)[W2V_FFNS[1]]
    with torch.no_grad():
        # (not a constant: the layer-normed input sums to zero over channels, a constant does nothing)
        ffn.fc1_private_weight[1].add_(torch.randn(ffn.fc1_private_weight[1].shape, generator=torch.Generator().manual_seed(3)))
        changed, _ = model(**batch)
    moved = (changed - before).abs().amax(dim=(1, 2))
    assert moved[:2].max() < 1e-5 and moved[2:].min() > 1e-3  # ar, et (group 0) untouched; ga, sw moved


def test_gdps_export_refuses_an_xm_transformer_gdps_checkpoint(w2v, wave_data, tmp_path, capsys, one_thread):
    """gdps-export folds only the s2t models; a split xm_transformer_gdps checkpoint (saved as
    fairseq-train saves one) is refused with a message that says so, and nothing is written."""
    model, args = build(w2v[0], wave_data, gdps_split_modules=W2V_FFNS[1], gdps_groups="ar,et;ga,sw")
    assert list(partitioned_ffns(model)) == [W2V_FFNS[1]]
    cfg = {"_name": None, "common": {"user_dir": str(REPO / "fairseq_gdps"), "seed": 1}, "model": args,
           "task": {"_name": "speech_to_text_gdps", "data": str(wave_data), "config_yaml": "config.yaml"},
           "criterion": {"_name": "label_smoothed_cross_entropy_gdps", "label_smoothing": 0.1}}
    path = tmp_path / "xm_stage2.pt"
    torch.save({"args": None, "cfg": cfg, "model": model.state_dict(), "criterion": None,
                "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyGDPSCriterion",
                                       "optimizer_name": "FairseqAdam", "lr_scheduler_state": {}, "num_updates": 3}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, path)
    out = tmp_path / "ar.pt"
    with pytest.raises(ExportError, match=r"xm_stage2.pt: a xm_transformer_gdps checkpoint; gdps-export folds only "
                                          r"s2t_conformer_gdps, s2t_transformer_gdps checkpoints"):
        export_checkpoint(path, out, language="ar")
    assert export_main([str(path), "--language", "ar", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "gdps-export: error: " in err and "xm_transformer_gdps checkpoint" in err
    assert not out.exists() and not list(tmp_path.glob(".ar.pt.*"))


# --------------------------------------------------------------------------- fairseq-train
def train_args(data, w2v_path, save_dir, max_update, *extra):
    return [BIN / "fairseq-train", data, "--user-dir", REPO / "fairseq_gdps", "--task", "speech_to_text_gdps",
            "--arch", "xm_transformer_gdps", "--w2v-path", w2v_path,
            *[x for k, v in MODEL_SIZES.items() for x in (f"--{k.replace('_', '-')}", v)],
            "--criterion", "label_smoothed_cross_entropy_gdps", "--train-subset", "train", "--valid-subset", "dev",
            "--max-tokens", "200000", "--max-source-positions", "400000", "--max-update", max_update,
            "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "fixed", "--save-dir", save_dir,
            "--no-epoch-checkpoints", "--num-workers", "0", "--seed", "1", "--cpu", "--log-format", "simple",
            *extra]


@pytest.mark.slow
def test_stage1_probe_freezing_and_split_with_fairseq_train(w2v, wave_data, tmp_path, one_thread):
    w2v_path, w2v_state = w2v
    save = tmp_path / "stage1"
    stats_path = save / "stats.pt"
    train_only = "decoder.*,encoder.adaptor.*,*.ffn*"
    run(train_args(wave_data, w2v_path, save, 3, "--gdps-probe-interval", "1", "--gdps-summed-statistics",
                   "--gdps-stats", stats_path, "--gdps-train-only", train_only))

    # statistics for the wav2vec 2.0 FFNs, for every language that was in a probed batch
    stats = GradientStatistics.load(stats_path)
    assert stats.num_steps == 3
    counts = stats.counts()
    for block in W2V_FFNS:
        assert sum(counts[lang][block] for lang in counts) >= 3, block
        sums = stats.module_sums(block)
        assert sums["S"].shape[1] == 2 * 32 * 64 + 64 + 32 and bool((sums["Q"] > 0).any())

    # frozen wav2vec 2.0 parameters are those of --w2v-path; its FFNs (trained) moved
    ckpt = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    assert ckpt["cfg"].model.gdps_train_only == train_only
    trained_keys = [k for k in w2v_state if ".fc1." in k or ".fc2." in k]
    frozen_keys = [k for k in w2v_state if k in {k2[len(W2V) + 1:] for k2 in ckpt["model"] if k2.startswith(W2V)}
                   and k not in trained_keys]
    assert len(trained_keys) == 8 and len(frozen_keys) > 20
    for key in frozen_keys:
        assert torch.equal(ckpt["model"][f"{W2V}.{key}"], w2v_state[key]), f"frozen {key} changed"
    for key in trained_keys:
        assert not torch.equal(ckpt["model"][f"{W2V}.{key}"], w2v_state[key]), f"trained {key} did not change"

    # the stage-1 model (as fairseq-generate rebuilds it) splits one encoder FFN without changing its output
    model = models.build_model(ckpt["cfg"].model, Task(wave_data))
    model.load_state_dict(ckpt["model"], strict=True, model_cfg=ckpt["cfg"].model)
    model.eval()
    batch = real_batch(wave_data)
    with torch.no_grad():
        before, _ = model(**batch)
    model.encoder.set_language_groups([0, 0, 1, 1])
    split_ffns(model, [W2V_FFNS[0]], n_groups=2, shared_ratio=0.25)
    with torch.no_grad():
        after, _ = model(**batch)
    assert (after - before).abs().max().item() < 1e-5
