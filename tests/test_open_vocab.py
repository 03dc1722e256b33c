"""Open-vocabulary queries on a trained segmentor: new names go through the same contexts, text encoder and context
decoder (language.py's one text path and score map), written out here; the training names give the
training map."""
import pytest
import torch
import torch.nn.functional as F

from denseclip.data.procedural import SHAPE_CLASSES
from denseclip import language
from denseclip.language import drop_text_encoder, tokenize_class_names
from denseclip import build_model


def score_map(model, zg, zd, names=None):
    """s (B, K, h, w) as the segmentor computes it: language.py's text path, then its score map."""
    return language.score_map(zd, language.context_aware_text(model, zg, zd, names))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("denseclip_tiny", SHAPE_CLASSES).eval()
    with torch.no_grad():
        m.gamma.fill_(0.5)  # a visible context-decoder contribution (its init is 1e-4)
    return m


def test_new_names_through_contexts_text_encoder_and_context_decoder(model):
    names = ["kettle", "sky", "circle"]
    with torch.no_grad():
        _, zg, zd = model.backbone.forward_dense(torch.randn(2, 3, 64, 96))
        s = score_map(model, zg, zd, names)
        # written out: [SOT, contexts, name, EOT] -> text encoder -> t + γ · decoder(t, [z̄; z]) -> cosine
        t = model.text_encoder(tokenize_class_names(names, 5, False), model.contexts).expand(2, -1, -1)  # (B, K', D)
        visual = torch.cat([zg[:, None], zd.flatten(2).transpose(1, 2)], dim=1)  # (B, 1+hw, D)
        t = t + model.gamma * model.context_decoder(t, visual)
        expected = torch.einsum("bdhw,bkd->bkhw", F.normalize(zd, dim=1), F.normalize(t, dim=2))
        assert s.shape == (2, 3, 2, 3) and torch.allclose(s, expected, atol=1e-5)
        # the training names through the open-vocabulary path give the training score map
        assert torch.allclose(score_map(model, zg, zd, SHAPE_CLASSES), score_map(model, zg, zd), atol=1e-6)


def test_predict_with_names_is_softmax_of_scores_over_tau(model):
    x = torch.randn(1, 3, 64, 160)  # wider than the 128 test crop: two slide windows
    with torch.no_grad():
        whole = model.predict(x, names=["kettle", "sky"], mode="whole")
        slide = model.predict(x, names=["kettle", "sky"], mode="slide")
        logits = model.score_logits(x, ["kettle", "sky"])
    assert torch.allclose(whole, logits.softmax(1), atol=1e-6)
    assert slide.shape == (1, 2, 64, 160) and torch.allclose(slide.sum(1), torch.ones(1, 64, 160), atol=1e-5)


def test_text_free_export_answers_for_training_names_only(model):
    export = build_model("denseclip_tiny", SHAPE_CLASSES).eval()
    export.load_state_dict(model.state_dict())
    drop_text_encoder(export)
    with torch.no_grad():
        _, zg, zd = model.backbone.forward_dense(torch.randn(1, 3, 64, 64))
        assert torch.allclose(score_map(export, zg, zd, ["star", "circle"]),
                              score_map(model, zg, zd, ["star", "circle"]), atol=1e-5)
        with pytest.raises(ValueError, match="no text encoder"):
            score_map(export, zg, zd, ["kettle"])
    with pytest.raises(ValueError, match="more than class_token_length 5"):
        language.name_tokens(model, ["a very long name of a thing"])
