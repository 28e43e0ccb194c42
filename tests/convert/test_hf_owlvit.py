"""Interop with transformers' OWL-ViT and OWLv2: random-weight detectors of the real widths and input sizes
(B/32 at 768 px, OWLv2 B/16 at 960 px; two blocks per tower to keep CI fast), loaded by vlp, compared on
logits, boxes and objectness, on post-processed detections, exported back; the image processors' pixels."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.convert import ConversionError, export_pretrained, load_pretrained
from vlp.tasks.detection import DetectionPredictor

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
QUERIES = ["a photo of a dog.", "a red circle", "two cats on a sofa"]
TEXT = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 8,
        "max_position_embeddings": 16}
VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 2, "num_attention_heads": 12}


def _reference(v2: bool):
    torch.manual_seed(0)
    if v2:
        config = transformers.Owlv2Config(text_config=TEXT, vision_config={**VISION, "image_size": 960, "patch_size": 16},
                                          projection_dim=512)
        model = transformers.Owlv2ForObjectDetection(config)
    else:
        config = transformers.OwlViTConfig(text_config=TEXT, vision_config={**VISION, "image_size": 768, "patch_size": 32},
                                           projection_dim=512)
        model = transformers.OwlViTForObjectDetection(config)
    # transformers zero-initialises the heads' biases and leaves the last box layer at its default: give every
    # head tensor values that matter, so that a mix-up of any two would show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "head" in name or name.startswith("layer_norm"):
                param.normal_(0, 0.02 if param.ndim > 1 else 0.5)
    return model.eval()


def _save(model, folder, clip_vocab, processor):
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip_vocab / name, folder / name)
    processor.save_pretrained(folder)
    return folder


def _images():
    rng = np.random.default_rng(0)
    sizes = [(320, 200), (180, 260)]  # wide and tall: the padding and the squash both matter
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("v2", [False, True], ids=["owlvit-b32-768", "owlv2-b16-960"])
def test_hf_owl_detector_parity_both_ways(tmp_path, clip_vocab, v2):
    ref = _reference(v2)
    processor_cls = transformers.Owlv2ImageProcessorPil if v2 else transformers.models.owlvit.OwlViTImageProcessorPil
    size = 960 if v2 else 768
    processor = processor_cls(size={"height": size, "width": size})
    folder = _save(ref, tmp_path / "hf", clip_vocab, processor)
    pretrained = load_pretrained(folder)
    assert pretrained.config.objectness == v2 and pretrained.family.name == "owlvit"

    images = _images()
    # The image processor's pixels, reproduced (v1: squashed, bicubic; v2: padded with 0.0, anti-aliased).
    expected_pixels = torch.as_tensor(np.stack(processor(images=images)["pixel_values"]))
    transform = pretrained.image_transform()
    pixels = torch.stack([transform(image) for image in images])
    torch.testing.assert_close(pixels, expected_pixels, atol=1e-5, rtol=0)

    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, pad_token="!", model_max_length=16)
    ids = tokenizer(QUERIES * 2, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = ref(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
        ours_ids, ours_mask = pretrained.tokenizer(QUERIES)
        assert torch.equal(ours_ids, ids.input_ids[:3])
        out = pretrained.model(pixels, ours_ids.expand(2, -1, -1), ours_mask.expand(2, -1, -1))
    torch.testing.assert_close(out.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, expected.pred_boxes, atol=ATOL, rtol=0)
    if v2:
        torch.testing.assert_close(out.objectness_logits, expected.objectness_logits, atol=ATOL, rtol=0)

    # Post-processed detections in the original images' pixels: the same boxes, scores and labels.
    post = processor.post_process_object_detection(expected, threshold=0.0,
                                                   target_sizes=[(im.size[1], im.size[0]) for im in images])
    found = DetectionPredictor(pretrained).detect(images, QUERIES, threshold=0.0)
    for reference, ours, image in zip(post, found, images, strict=True):
        order = reference["scores"].argsort(descending=True)
        assert [d.label for d in ours[:20]] == reference["labels"][order][:20].tolist()
        np.testing.assert_allclose([d.score for d in ours[:20]], reference["scores"][order][:20].numpy(), atol=1e-4)
        # transformers does not clip boxes to the image; vlp does.
        limits = np.array([image.size[0], image.size[1]] * 2)
        reference_boxes = np.minimum(reference["boxes"][order][:20].clamp(min=0).numpy(), limits)
        np.testing.assert_allclose([d.box for d in ours[:20]], reference_boxes, atol=0.02)

    # Exported back: transformers reads the same weights and gives the same outputs.
    exported = export_pretrained(pretrained, "hf", tmp_path / "back")
    again = (transformers.Owlv2ForObjectDetection if v2 else transformers.OwlViTForObjectDetection).from_pretrained(
        exported).eval()
    with torch.no_grad():
        round_trip = again(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
    torch.testing.assert_close(round_trip.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(round_trip.pred_boxes, expected.pred_boxes, atol=1e-5, rtol=0)
    assert load_pretrained(exported).image_config == pretrained.image_config


def test_models_hugging_face_cannot_hold_are_refused(tmp_path, clip_vocab):
    folder = _save(_reference(False), tmp_path / "hf", clip_vocab, transformers.models.owlvit.OwlViTImageProcessorPil())
    pretrained = load_pretrained(folder)
    pretrained.config.box_bias = "location"
    with pytest.raises(ConversionError, match="box_bias"):
        export_pretrained(pretrained, "hf", tmp_path / "out")
