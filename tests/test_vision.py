"""The vision tower: both outputs of one forward against open_clip's own computation."""

import pytest
import torch

pytest.importorskip("open_clip")

from sea_model import tiny_models as shipped  # noqa: E402
from sea_model.config import VisionConfig  # noqa: E402
from sea_model.vision import HFJointHead, VisionTower, expand2square, load_clip  # noqa: E402
from tests import tiny  # noqa: E402


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(tiny.tiny_vision_config())


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def block_outputs(visual, x):
    """Every block's output (and ln_pre's) recorded by forward hooks during open_clip's own encode."""
    seen = {}
    hooks = [visual.ln_pre.register_forward_hook(lambda m, i, o: seen.__setitem__(0, o))]
    for k, blk in enumerate(visual.transformer.resblocks):
        hooks.append(blk.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k + 1, o)))
    with torch.no_grad():
        visual(x)
    for h in hooks:
        h.remove()
    return seen


def test_shapes_and_grid(clip, images):
    tower = VisionTower.from_clip(clip)
    out = tower(images)
    assert tower.grid == (4, 4) and tower.num_patches == 16 and out.grid == (4, 4)
    assert out.hidden.shape == (2, 16, 32)  # width 32, CLS dropped
    assert out.patch_features.shape == (2, 16, 16)  # embed_dim 16
    assert out.pooled.shape == (2, 16)
    assert tower.hidden_size == 32 and tower.feature_dim == 16


@pytest.mark.parametrize("select_layer, block", [(-2, 2), (-1, 3), (1, 1), (0, 0), (-4, 0)])
def test_hidden_is_the_selected_layer_without_cls(clip, images, select_layer, block):
    # 3 blocks: HF indexing [embeddings, block1, block2, block3]; -2 -> block 2.
    tower = VisionTower(clip.model.visual, clip.preprocess_cfg, select_layer=select_layer)
    expected = block_outputs(clip.model.visual, images)[block][:, 1:]
    torch.testing.assert_close(tower(images).hidden, expected)
    adapter_only = tower(images, joint_space=False)  # stops after the selected block
    torch.testing.assert_close(adapter_only.hidden, expected)
    assert adapter_only.patch_features is None and adapter_only.pooled is None


def test_patch_features_are_last_layer_ln_post_proj(clip, images):
    v = clip.model.visual
    last = block_outputs(v, images)[len(v.transformer.resblocks)]
    with torch.no_grad():
        expected = v.ln_post(last[:, 1:]) @ v.proj
    torch.testing.assert_close(VisionTower.from_clip(clip)(images).patch_features, expected)


def test_pooled_false_skips_the_pooled_head_only(clip, images, monkeypatch):
    """``pooled=False`` (what SEA asks for): the same patch features, no pooled embedding, and the head
    (ln_post) runs on the patch tokens only."""
    tower = VisionTower.from_clip(clip)
    full = tower(images)
    rows = []
    ln_post = tower.visual.ln_post
    monkeypatch.setattr(ln_post, "forward", lambda x, f=ln_post.forward: rows.append(x.shape[:-1]) or f(x))
    lean = tower(images, pooled=False)
    assert lean.pooled is None and rows == [(2, 16)]
    assert torch.equal(lean.patch_features, full.patch_features) and torch.equal(lean.hidden, full.hidden)


def test_pooled_equals_encode_image(clip, images):
    out = VisionTower.from_clip(clip)(images)
    with torch.no_grad():
        torch.testing.assert_close(out.pooled, clip.model.encode_image(images))
        # and the patch features apply the same map the CLS token gets
        v = clip.model.visual
        last = block_outputs(v, images)[len(v.transformer.resblocks)]
        torch.testing.assert_close(out.pooled, v.ln_post(last[:, 0]) @ v.proj)


def test_select_layer_out_of_range_is_an_error(clip):
    with pytest.raises(ValueError, match="select_layer"):
        VisionTower(clip.model.visual, clip.preprocess_cfg, select_layer=-5)


def test_wrong_pixel_shape_is_an_error(clip):
    with pytest.raises(ValueError, match="pixel_values"):
        VisionTower.from_clip(clip)(torch.zeros(1, 3, 64, 64))


def test_tower_is_frozen_and_stays_in_eval(clip):
    tower = VisionTower.from_clip(clip)
    tower.train()
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())


def test_siglip_style_timm_tower():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    clip = load_clip(VisionConfig(name="tiny-siglip", pretrained=None, model_cfg=tiny.tiny_siglip_config()))
    tower = VisionTower.from_clip(clip)
    x = torch.randn(2, 3, 32, 32)
    out = tower(x)
    assert out.hidden.shape == (2, 16, 32) and out.patch_features.shape == (2, 16, 32) and out.grid == (4, 4)
    trunk = clip.model.visual.trunk
    with torch.no_grad():
        torch.testing.assert_close(out.pooled, clip.model.encode_image(x))
        # hidden: output of block -2 (the first of two); patch features: the MAP head's value path
        # of each final-norm token, written out from the head's weights.
        _, inter = trunk.forward_intermediates(x, indices=[0], output_fmt="NLC")
        torch.testing.assert_close(out.hidden, inter[0])
        torch.testing.assert_close(tower(x, joint_space=False).hidden, inter[0])
        lean = tower(x, pooled=False)
        assert lean.pooled is None and torch.equal(lean.patch_features, out.patch_features)
        final = trunk.forward_features(x)
        pool = trunk.attn_pool
        C = final.shape[-1]
        value = final @ pool.kv.weight[C:].T + pool.kv.bias[C:]
        y = pool.proj(value)
        y = y + pool.mlp(pool.norm(y))
        torch.testing.assert_close(out.patch_features, y, rtol=1e-4, atol=1e-5)


def _stripes(width, height):
    """White leftmost quarter, black elsewhere."""
    from PIL import Image

    im = Image.new("RGB", (width, height), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, width // 4, height))
    return im


def test_preprocessing_modes(clip):
    tower = VisionTower.from_clip(clip)
    wide = _stripes(64, 32)
    mean = torch.tensor(clip.preprocess_cfg["mean"]).view(3, 1)
    std = torch.tensor(clip.preprocess_cfg["std"]).view(3, 1)
    white = (1 - mean) / std

    tower.image_aspect_ratio = "square"  # squash: the white edge survives at full height
    sq = tower.image_processor()(wide)
    assert sq.shape == (3, 32, 32)
    torch.testing.assert_close(sq[:, :, 0], white.expand(3, 32), atol=0.05, rtol=0)

    tower.image_aspect_ratio = "crop"  # centre crop of the short side: the white edge is cut off
    assert tower.image_processor()(wide)[:, :, 0].mean(0).max() < 0  # black: (0 - mean) / std < 0

    tower.image_aspect_ratio = "pad"  # mean-colour bands above and below: normalised ~ 0
    padded = tower.image_processor()(wide)
    assert padded[:, 0, :].abs().max() < 0.02 and padded[:, -1, :].abs().max() < 0.02
    torch.testing.assert_close(padded[:, 16, 0], white[:, 0], atol=0.05, rtol=0)


def test_expand2square_centres_the_image():
    from PIL import Image

    im = expand2square(Image.new("RGB", (40, 20), (255, 0, 0)), (1, 2, 3))
    assert im.size == (40, 40)
    assert (
        im.getpixel((0, 0)) == (1, 2, 3) and im.getpixel((20, 20)) == (255, 0, 0) and im.getpixel((20, 35)) == (1, 2, 3)
    )


# --------------------------------------------------------------------------- Hugging Face towers


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_pair(request):
    """A tiny random HF CLIP/SigLIP model and a tiny Llava whose vision tower has its weights."""
    torch.manual_seed(0)
    clip = shipped.tiny_hf_clip(request.param)
    return request.param, clip, tiny.tiny_tokenizer()


def _llava(clip, tok, layer, strategy):
    torch.manual_seed(1)
    return shipped.tiny_hf_llava(clip, tok, vision_feature_layer=layer, vision_feature_select_strategy=strategy).eval()


@pytest.mark.parametrize("layer", [-2, -1, 1, [-3, -1]])  # (layer 0 trips Llava itself)
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_hf_hidden_matches_llava_get_image_features(hf_pair, images, layer, strategy):
    family, clip, tok = hf_pair
    llava = _llava(clip, tok, layer, strategy)
    tower = VisionTower.from_hf(llava.model.vision_tower, select_layer=layer, select_strategy=strategy)
    with torch.no_grad():
        out = tower(images, joint_space=False)
        expected = torch.stack(list(llava.get_image_features(pixel_values=images).pooler_output))
        got = llava.model.multi_modal_projector(out.hidden)
    torch.testing.assert_close(got, expected)
    prefix = 1 if family == "clip" else 0
    dropped = 1 if strategy == "default" else 0
    assert out.hidden.shape[1] == tower.num_tokens == 16 + prefix - dropped
    assert tower.tokens_are_patches == (prefix == dropped)
    assert tower.hidden_size == 32 * (len(layer) if isinstance(layer, list) else 1)


def test_hf_patch_head_on_cls_reproduces_get_image_features(hf_pair, images):
    family, clip, _ = hf_pair
    tower = VisionTower.from_hf(clip, select_strategy="default" if family == "clip" else "full")
    with torch.no_grad():
        out = tower(images)
        expected = clip.get_image_features(pixel_values=images).pooler_output
        last = clip.vision_model(pixel_values=images).last_hidden_state
    torch.testing.assert_close(out.pooled, expected)
    assert out.patch_features.shape == (2, 16, tower.feature_dim) and out.grid == (4, 4)
    # The per-patch head applied to one token reproduces the pooled embedding of that token:
    # CLIP's CLS through post_layernorm + visual_projection is get_image_features exactly.
    head = HFJointHead(clip)
    with torch.no_grad():
        pooled, patches = head(last)
        no_pool, same = head(last, pooled=False)
        lean = tower(images, pooled=False)
    torch.testing.assert_close(patches, out.patch_features)
    assert no_pool is None and torch.equal(same, patches)
    assert lean.pooled is None and torch.equal(lean.patch_features, out.patch_features)
    if family == "clip":
        cls_as_patch = head(last[:, :1].expand(-1, 2, -1).contiguous())[1][:, 0]
        torch.testing.assert_close(cls_as_patch, expected)
    else:  # SigLIP: one token pooled alone is the head's value path, the same for a lone token
        one = head(last[:, 3:4].expand(-1, 2, -1).contiguous())[0]
        torch.testing.assert_close(one, patches[:, 3])


def test_hf_vision_model_without_projection(hf_pair, images):
    family, clip, tok = hf_pair
    if family != "clip":
        pytest.skip("SigLIP vision models carry their head")
    llava = _llava(clip, tok, -2, "default")
    tower = VisionTower.from_hf(llava.model.vision_tower)  # CLIPVisionModel: no visual_projection
    assert tower.feature_dim is None
    with pytest.raises(ValueError, match="no visual_projection"):
        tower(images)
    with pytest.raises(ValueError, match="no visual_projection"):
        HFJointHead(llava.model.vision_tower)


def test_hf_tower_by_local_path(hf_pair, images, tmp_path):
    family, clip, tok = hf_pair
    clip.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    cfg = VisionConfig(name=str(tmp_path / "clip"), select_strategy="default" if family == "clip" else "full")
    assert cfg.resolved_library() == "transformers"
    bundle = load_clip(cfg)
    tower = VisionTower.from_clip(bundle)
    with torch.no_grad():
        torch.testing.assert_close(tower(images).pooled, clip.get_image_features(pixel_values=images).pooler_output)
    feats = bundle.encode_text(["cat", "red dog"])
    assert feats.shape == (2, tower.feature_dim)
    assert "file:" in bundle.key()
    random = load_clip(VisionConfig(name=str(tmp_path / "clip"), pretrained=None))
    assert "random:" in random.key() and random.key() != bundle.key()


def test_a_random_named_tower_builds_without_the_missing_weights_warning(caplog):
    """pretrained=None is a choice (random towers for tests and benchmarks): open_clip's warning is dropped."""
    pytest.importorskip("open_clip")
    import logging

    from sea_model.config import VisionConfig
    from sea_model.vision import load_clip

    with caplog.at_level(logging.WARNING):
        load_clip(VisionConfig(name="ViT-S-32", pretrained=None))
        assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
        logging.warning("No pretrained weights loaded for model 'x'")  # the filter was removed afterwards
        assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
