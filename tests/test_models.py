"""Stage-2 GDPS models: function-preserving split of stock S2T models, per-group updates, the plan
inside the checkpoint, beam search and export to the stock architecture."""
import copy
from argparse import Namespace

import pytest
import torch

from fairseq import checkpoint_utils, models
from fairseq.data import Dictionary
from fairseq.sequence_generator import SequenceGenerator
from omegaconf import OmegaConf

from fairseq_gdps.gdps.plan import Plan, PlanError
from fairseq_gdps.models import (
    GROUP_IDS_KEY,
    dense_state_dict,
    ffn_module_names,
    partitioned_ffns,
)

FEAT = 8
LANGS = ["aeb", "bem", "est", "gle"]  # task language ids 0..3 (sorted, as the task makes them)
GROUPS = "aeb,est,gle;bem"  # group 0: aeb, est, gle; group 1: bem
SIZES = dict(encoder_layers=2, decoder_layers=2, encoder_embed_dim=32, decoder_embed_dim=32,
             encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, encoder_attention_heads=2,
             decoder_attention_heads=2, conv_channels=16, input_feat_per_channel=FEAT, input_channels=1,
             max_source_positions=1000, max_target_positions=100, dropout=0.1, fp16=False,
             depthwise_conv_kernel_size=3)
SPLIT = {"s2t_transformer": ["encoder.transformer_layers.1.ffn", "decoder.layers.0.ffn"],
         "s2t_conformer": ["encoder.conformer_layers.1.ffn2", "encoder.conformer_layers.0.ffn1",
                           "decoder.layers.0.ffn"]}


class FakeTask:
    def __init__(self, languages=LANGS):
        d = Dictionary()
        for i in range(20):
            d.add_symbol(f"w{i}")
        self.target_dictionary = d
        self.source_dictionary = None
        self.languages = list(languages)


def build(arch, task, **extra):
    args = Namespace(arch=arch, **SIZES, **extra)
    return models.build_model(args, task), args


def stock(kind, task, seed=0):
    torch.manual_seed(seed)
    return build(kind, task)[0].eval()


def save_checkpoint(path, model, args):
    """A checkpoint as fairseq's trainer writes it: cfg (model args inside) + model state."""
    cfg = OmegaConf.create({"model": args}, flags={"allow_objects": True})
    state = {"args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
             "model": model.state_dict(), "criterion": None,
             "optimizer_history": [{"criterion_name": "x", "optimizer_name": "y", "lr_scheduler_state": {},
                                    "num_updates": 0}],
             "task_state": {}, "extra_state": {"train_iterator": {"epoch": 1}}, "last_optimizer_state": None}
    torch.save(state, path)


def load_checkpoint(path, task):
    """As fairseq's load_model_ensemble_and_task: rebuild from the stored args, load the state."""
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    model = models.build_model(state["cfg"].model, task)
    model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)
    return model.eval(), state["cfg"].model


def batch(lang_ids, seed=1, t_in=23, t_out=6):
    g = torch.Generator().manual_seed(seed)
    b = len(lang_ids)
    lengths = torch.tensor([t_in - 3 * (i % 3) for i in range(b)])
    return {"src_tokens": torch.randn(b, t_in, FEAT, generator=g), "src_lengths": lengths,
            "prev_output_tokens": torch.randint(4, 24, (b, t_out), generator=g),
            "src_lang_id": torch.tensor(lang_ids)}


def run_stock(model, net_input):
    return model(net_input["src_tokens"], net_input["src_lengths"], net_input["prev_output_tokens"])[0]


@pytest.fixture
def stage1(tmp_path):
    """Per kind: a random stock model and its stage-1 checkpoint."""
    def make(kind):
        task = FakeTask()
        model = stock(kind, task)
        args = Namespace(arch=kind, **SIZES)
        models.build_model(args, task)  # fills the arch defaults into args, as training does
        path = tmp_path / f"{kind}_stage1.pt"
        save_checkpoint(path, model, args)
        return task, model, path
    return make


def gdps(kind, task, init_from, **extra):
    opts = dict(gdps_split_modules=",".join(SPLIT[kind]), gdps_groups=GROUPS, gdps_shared_ratio=0.5,
                gdps_init_from=str(init_from))
    opts.update(extra)
    return build(f"{kind}_gdps", task, **opts)


def test_ffn_module_names():
    task = FakeTask()
    names = list(ffn_module_names(stock("s2t_transformer", task)))
    assert names == ["encoder.transformer_layers.0.ffn", "encoder.transformer_layers.1.ffn",
                     "decoder.layers.0.ffn", "decoder.layers.1.ffn"]
    names = list(ffn_module_names(stock("s2t_conformer", task)))
    assert names == ["encoder.conformer_layers.0.ffn1", "encoder.conformer_layers.0.ffn2",
                     "encoder.conformer_layers.1.ffn1", "encoder.conformer_layers.1.ffn2",
                     "decoder.layers.0.ffn", "decoder.layers.1.ffn"]
    fc1, fc2 = ffn_module_names(stock("s2t_conformer", task))["encoder.conformer_layers.1.ffn2"]
    assert fc1.weight.shape == (64, 32) and fc2.weight.shape == (32, 64)


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
@pytest.mark.parametrize("init", ["energy", "svd", "random"])
def test_split_preserves_function(stage1, kind, init):
    task, ref_model, path = stage1(kind)
    model, args = gdps(kind, task, path, gdps_init=init)
    model.eval()
    split = partitioned_ffns(model)
    assert sorted(split) == sorted(SPLIT[kind])
    assert all(m.n_groups == 2 and m.n_shared == 32 and m.n_private == 32 for m in split.values())
    assert not set(SPLIT[kind]) & set(ffn_module_names(model))
    assert args.gdps_init_from is None  # consumed: the checkpoint will hold the weights
    ni = batch([0, 1, 2, 3, 1])
    with torch.no_grad():
        ref = run_stock(ref_model, ni)
        for lang in range(len(LANGS)):  # every language, alone
            one = dict(ni, src_lang_id=torch.full((5,), lang))
            torch.testing.assert_close(model(**one)[0], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(**ni)[0], ref, atol=1e-5, rtol=1e-5)  # mixed batch


def test_missing_language_ids_is_an_error(stage1):
    task, _, path = stage1("s2t_transformer")
    model = gdps("s2t_transformer", task, path)[0].eval()
    ni = batch([0, 1])
    del ni["src_lang_id"]
    with pytest.raises(RuntimeError, match="src_lang_id"):
        model(**ni)


def sgd_step(model, net_input, lr=0.5):
    model.train()
    model.zero_grad()
    out = model(**net_input)[0]
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                             net_input["prev_output_tokens"].reshape(-1))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
    model.eval()


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_sgd_update_on_one_group_leaves_other_private_weights(stage1, kind):
    """Plain SGD on a fresh model: the other group's private weights get a zero gradient and stay.
    Under the recipes' Adam with weight decay they do move (decay, and momentum once trained):
    see test_group_isolation.py for what holds there."""
    task, _, path = stage1(kind)
    model = gdps(kind, task, path)[0]
    before = {n: copy.deepcopy(m.state_dict()) for n, m in partitioned_ffns(model).items()}
    sgd_step(model, batch([0, 2, 3, 0]))  # aeb, est, gle: all group 0
    for name, ffn in partitioned_ffns(model).items():
        for p in ("fc1_private_weight", "fc1_private_bias", "fc2_private_weight"):
            old, new = before[name][p], getattr(ffn, p).detach()
            assert torch.equal(new[1], old[1]), f"{name}.{p}: group 1 changed"
            assert not torch.equal(new[0], old[0]), f"{name}.{p}: group 0 did not change"
        assert not torch.equal(ffn.fc1_shared_weight.detach(), before[name]["fc1_shared_weight"])


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_checkpoint_round_trip_routes_the_same(stage1, tmp_path, kind):
    task, _, path = stage1(kind)
    model, args = gdps(kind, task, path)
    sgd_step(model, batch([1, 1, 0]))  # groups now differ
    sgd_step(model, batch([0, 2, 3]))
    ckpt = tmp_path / "stage2.pt"
    save_checkpoint(ckpt, model, args)
    path.unlink()  # the stage-1 checkpoint is not needed to rebuild
    rebuilt, cfg = load_checkpoint(ckpt, FakeTask())
    assert cfg.gdps_split_modules == ",".join(SPLIT[kind]) and cfg.gdps_groups == GROUPS
    assert cfg.gdps_route_languages == ",".join(LANGS)
    ni = batch([3, 1, 0, 1, 2])
    with torch.no_grad():
        out = model(**ni)[0]
        torch.testing.assert_close(rebuilt(**ni)[0], out, atol=1e-6, rtol=1e-6)
        # and routing really depends on the language: bem (group 1) vs aeb (group 0) differ
        alt = rebuilt(**dict(ni, src_lang_id=torch.zeros(5, dtype=torch.long)))[0]
        assert not torch.allclose(alt[1], out[1]) and torch.allclose(alt[2], out[2], atol=1e-6)


def test_task_language_order_is_followed(stage1, tmp_path):
    """Language ids are indices into the task's language list; groups are matched by name."""
    task, ref_model, path = stage1("s2t_transformer")
    model, args = gdps("s2t_transformer", task, path)
    sgd_step(model, batch([1, 1]))
    ckpt = tmp_path / "stage2.pt"
    save_checkpoint(ckpt, model, args)
    shuffled = ["gle", "bem", "aeb", "est"]
    rebuilt, _ = load_checkpoint(ckpt, FakeTask(shuffled))
    ni = batch([0, 1, 2, 3])
    ni_shuffled = dict(ni, src_lang_id=torch.tensor([shuffled.index(LANGS[i]) for i in range(4)]))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**ni_shuffled)[0], model(**ni)[0], atol=1e-6, rtol=1e-6)


def test_plan_file_is_stored_in_the_checkpoint(stage1, tmp_path):
    task, ref_model, path = stage1("s2t_conformer")
    plan = tmp_path / "plan.json"
    Plan(modules=["encoder.conformer_layers.1.ffn2"], groups=[["aeb", "est", "gle"], ["bem"]],
         shared_ratio=0.25).save(plan)
    model, args = build("s2t_conformer_gdps", task, gdps_plan=str(plan), gdps_init_from=str(path))
    assert args.gdps_plan is None and args.gdps_split_modules == "encoder.conformer_layers.1.ffn2"
    assert args.gdps_groups == GROUPS and args.gdps_shared_ratio == 0.25 and "bem" in args.gdps_plan_json
    assert partitioned_ffns(model)["encoder.conformer_layers.1.ffn2"].n_shared == 16
    ckpt = tmp_path / "stage2.pt"
    save_checkpoint(ckpt, model, args)
    plan.unlink()
    rebuilt, _ = load_checkpoint(ckpt, FakeTask())
    ni = batch([1, 0, 3])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**ni)[0], run_stock(ref_model, ni), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="excludes"):
        build("s2t_conformer_gdps", task, gdps_plan=str(ckpt), gdps_groups="a;b")
    Plan(modules=["decoder.layers.0.ffn"], groups=[["aeb", "est"], ["bem"]], shared_ratio=0.5).save(plan)
    with pytest.raises(PlanError, match="gle"):  # the plan must cover the task's languages
        build("s2t_conformer_gdps", task, gdps_plan=str(plan))


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_beam_search_matches_stock_model(stage1, kind):
    """SequenceGenerator calls encoder(**net_input) and reorders encoder_out for the beam."""
    task, ref_model, path = stage1(kind)
    model = gdps(kind, task, path)[0].eval()
    ni = batch([1, 0, 3])
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=8)
    ref_gen = SequenceGenerator([ref_model], task.target_dictionary, beam_size=3, max_len_b=8)
    sample = {"net_input": {k: v for k, v in ni.items() if k != "prev_output_tokens"}}
    ref_sample = {"net_input": {k: v for k, v in sample["net_input"].items() if k != "src_lang_id"}}
    with torch.no_grad():
        hyps = gen.generate([model], sample)
        ref_hyps = ref_gen.generate([ref_model], ref_sample)
    for h, r in zip(hyps, ref_hyps):
        assert [x["tokens"].tolist() for x in h] == [x["tokens"].tolist() for x in r]
    enc = model.encoder(**sample["net_input"])
    assert enc[GROUP_IDS_KEY][0].tolist() == [1, 0, 0]
    reordered = model.encoder.reorder_encoder_out(enc, torch.tensor([2, 2, 0, 1]))
    assert reordered[GROUP_IDS_KEY][0].tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_dense_state_dict_exports_each_group(stage1, kind):
    task, _, path = stage1(kind)
    model = gdps(kind, task, path)[0]
    sgd_step(model, batch([1, 1, 0]))
    sgd_step(model, batch([0, 2, 3]))
    ni = batch([1, 0, 2])
    for group, lang in ((0, 0), (1, 1)):
        plain = build(kind, task)[0].eval()
        plain.load_state_dict(dense_state_dict(model, group), strict=True)
        one = dict(ni, src_lang_id=torch.full((3,), lang))
        with torch.no_grad():
            torch.testing.assert_close(run_stock(plain, one), model(**one)[0], atol=1e-5, rtol=1e-5)


def test_unsplit_gdps_model_is_stock(stage1):
    """Without a plan the GDPS arch is the stock model (same state dict) that accepts src_lang_id."""
    task, ref_model, path = stage1("s2t_transformer")
    model, _ = build("s2t_transformer_gdps", task)
    assert set(model.state_dict()) == set(ref_model.state_dict())
    model.load_state_dict(ref_model.state_dict())
    model.eval()
    ni = batch([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(**ni)[0], run_stock(ref_model, ni))


def test_unknown_module_name(stage1):
    task, _, path = stage1("s2t_transformer")
    with pytest.raises(ValueError, match="no unsplit FFN named"):
        gdps("s2t_transformer", task, path, gdps_split_modules="encoder.transformer_layers.9.ffn")


def test_architectures_build():
    task = FakeTask()
    for arch in ("s2t_transformer_gdps_xs", "s2t_conformer_gdps_xs"):
        args = Namespace(arch=arch, input_feat_per_channel=FEAT, input_channels=1, max_source_positions=1000,
                         max_target_positions=100, fp16=False, gdps_split_modules="decoder.layers.1.ffn",
                         gdps_groups=GROUPS)
        model = models.build_model(args, task)
        assert args.encoder_embed_dim == 160 and args.encoder_layers == 4 and args.decoder_layers == 2
        assert partitioned_ffns(model)["decoder.layers.1.ffn"].n_private == 256


# ---------------------------------------------------------------------------------------------
# --gdps-lang-embedding: a learned vector per language added to the encoder input
# ---------------------------------------------------------------------------------------------
EMBEDDING = "encoder.gdps_lang_embedding.weight"


def set_language_vectors(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.encoder.gdps_lang_embedding.weight
        w.copy_(torch.randn(w.shape, generator=g))


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
@pytest.mark.parametrize("split", [False, True])
def test_language_embedding_starts_as_the_model_without_it(stage1, kind, split):
    """Zero at the start: a stage-1 model without the embedding, loaded with --gdps-init-from into
    a model with it (a tagged baseline, or a split), computes exactly what it computed."""
    task, ref_model, path = stage1(kind)
    if split:
        model, args = gdps(kind, task, path, gdps_lang_embedding=True)
    else:
        model, args = build(f"{kind}_gdps", task, gdps_lang_embedding=True, gdps_init_from=str(path))
    model.eval()
    assert model.encoder.gdps_lang_embedding.weight.shape == (len(LANGS), 32)
    assert torch.equal(model.state_dict()[EMBEDDING], torch.zeros(len(LANGS), 32))
    assert args.gdps_lang_embedding_languages == ",".join(LANGS)
    assert bool(partitioned_ffns(model)) == split
    ni = batch([0, 1, 2, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(**ni)[0], run_stock(ref_model, ni), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_language_embedding_changes_the_output_per_language(kind):
    task = FakeTask()
    model, _ = build(f"{kind}_gdps", task, gdps_lang_embedding=True)
    model.eval()
    ni = batch([0, 0, 0])
    with torch.no_grad():
        at_zero = {lang: model(**dict(ni, src_lang_id=torch.full((3,), lang)))[0] for lang in range(len(LANGS))}
        assert all(torch.equal(at_zero[lang], at_zero[0]) for lang in at_zero)  # zero: no language information
        set_language_vectors(model)
        out = {lang: model(**dict(ni, src_lang_id=torch.full((3,), lang)))[0] for lang in range(len(LANGS))}
        for lang in range(1, len(LANGS)):
            assert not torch.allclose(out[lang], out[0], atol=1e-4), lang
        # each utterance gets its own language's vector in a mixed batch
        mixed = model(**dict(ni, src_lang_id=torch.tensor([2, 0, 3])))[0]
        for i, lang in enumerate([2, 0, 3]):
            torch.testing.assert_close(mixed[i], out[lang][i], atol=1e-5, rtol=1e-5)
        # the vector is added to every frame of the encoder input, before the first layer
        enc = model.encoder
        captured = {}
        first = enc.transformer_layers[0] if kind == "s2t_transformer" else enc.conformer_layers[0]
        handle = first.register_forward_pre_hook(lambda m, inputs: captured.update(x=inputs[0].clone()))
        for lang in (0, 1):
            enc(ni["src_tokens"], ni["src_lengths"], src_lang_id=torch.full((3,), lang))
            captured[lang] = captured.pop("x")
        handle.remove()
        difference = captured[1] - captured[0]  # T x B x C
        expected = enc.gdps_lang_embedding.weight[1] - enc.gdps_lang_embedding.weight[0]
        torch.testing.assert_close(difference, expected.expand_as(difference), atol=1e-5, rtol=1e-5)
    # it learns: an update moves the rows of the batch's languages only
    before = model.encoder.gdps_lang_embedding.weight.detach().clone()
    sgd_step(model, batch([1, 3]))
    after = model.encoder.gdps_lang_embedding.weight.detach()
    assert not torch.equal(after[1], before[1]) and not torch.equal(after[3], before[3])
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])


def test_language_embedding_needs_language_ids():
    model, _ = build("s2t_transformer_gdps", FakeTask(), gdps_lang_embedding=True)
    ni = batch([0, 1])
    del ni["src_lang_id"]
    with pytest.raises(RuntimeError, match="--gdps-lang-embedding.*src_lang_id"):
        model(**ni)
    with pytest.raises(ValueError, match="--gdps-lang-embedding needs the task's source languages"):
        build("s2t_transformer_gdps", FakeTask(languages=[]), gdps_lang_embedding=True)


@pytest.mark.parametrize("split", [False, True])
def test_language_embedding_checkpoint_round_trip(stage1, tmp_path, split):
    """The embedding and the languages of its rows travel in the checkpoint; a task that lists
    the languages in another order gets each language's own vector (rows are matched by name)."""
    task, _, path = stage1("s2t_transformer")
    if split:
        model, args = gdps("s2t_transformer", task, path, gdps_lang_embedding=True)
    else:
        model, args = build("s2t_transformer_gdps", task, gdps_lang_embedding=True)
    set_language_vectors(model)
    sgd_step(model, batch([1, 0, 3]))
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model, args)
    path.unlink()
    rebuilt, cfg = load_checkpoint(ckpt, FakeTask())
    assert cfg.gdps_lang_embedding is True and cfg.gdps_lang_embedding_languages == ",".join(LANGS)
    ni = batch([3, 1, 0, 2])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**ni)[0], model(**ni)[0], atol=1e-6, rtol=1e-6)
    shuffled = ["gle", "bem", "aeb", "est"]
    rebuilt, cfg = load_checkpoint(ckpt, FakeTask(shuffled))
    assert cfg.gdps_lang_embedding_languages == ",".join(LANGS)  # the rows keep their languages
    ni_shuffled = dict(ni, src_lang_id=torch.tensor([shuffled.index(LANGS[i]) for i in ni["src_lang_id"].tolist()]))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**ni_shuffled)[0], model(**ni)[0], atol=1e-6, rtol=1e-6)
    if split:
        return  # (the split refuses a language in no group at build time already)
    # a language the embedding was not trained for cannot be encoded
    rebuilt, _ = load_checkpoint(ckpt, FakeTask(LANGS + ["zzz"]))
    with pytest.raises(ValueError, match=r"language ids \[4\] have no vector"):
        rebuilt(**batch([0, 4]))


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_stage1_language_embedding_carries_into_stage2(stage1, tmp_path, kind):
    """A stage-1 model trained with the embedding: --gdps-init-from copies its vectors into the
    split model (a non-split parameter), which then computes what stage 1 computed."""
    task, _, _ = stage1(kind)
    first, args = build(f"{kind}_gdps", task, gdps_lang_embedding=True)
    set_language_vectors(first)
    sgd_step(first, batch([0, 1, 2, 3]))
    path = tmp_path / "tagged_stage1.pt"
    save_checkpoint(path, first, args)
    model, args2 = gdps(kind, task, path, gdps_lang_embedding=True)
    model.eval()
    assert torch.equal(model.state_dict()[EMBEDDING], first.state_dict()[EMBEDDING])
    assert args2.gdps_lang_embedding_languages == ",".join(LANGS)
    ni = batch([0, 1, 2, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(**ni)[0], first(**ni)[0], atol=1e-5, rtol=1e-5)
    # stage 2 without the flag would silently drop the learned vectors: refused, naming the flag
    with pytest.raises(RuntimeError, match="pass --gdps-lang-embedding to stage 2"):
        gdps(kind, task, path)


def test_language_embedding_rows_follow_the_stage1_checkpoint(stage1, tmp_path):
    """--gdps-init-from: the rows keep the stage-1 languages even when the stage-2 task lists the
    languages in another order."""
    task, _, _ = stage1("s2t_transformer")
    first, args = build("s2t_transformer_gdps", task, gdps_lang_embedding=True)
    set_language_vectors(first)
    path = tmp_path / "tagged_stage1.pt"
    save_checkpoint(path, first, args)
    shuffled = ["gle", "bem", "aeb", "est"]
    model, args2 = gdps("s2t_transformer", FakeTask(shuffled), path, gdps_lang_embedding=True)
    assert args2.gdps_lang_embedding_languages == ",".join(LANGS)
    ni = batch([0, 1, 2, 3])
    ni_shuffled = dict(ni, src_lang_id=torch.tensor([shuffled.index(lang) for lang in LANGS]))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**ni_shuffled)[0], first.eval()(**ni)[0], atol=1e-5, rtol=1e-5)
