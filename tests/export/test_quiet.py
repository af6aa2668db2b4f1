import logging
import warnings

from ertacache.export.quiet import ONNX_REGISTRY_LOGGER, ONNXSCRIPT_FOLDING_LOGGER, known_exporter_messages_filtered


def test_only_the_known_messages_are_dropped_and_only_inside_the_block(caplog):
    logger = logging.getLogger(ONNX_REGISTRY_LOGGER)
    folding = logging.getLogger(ONNXSCRIPT_FOLDING_LOGGER)
    caplog.set_level(logging.WARNING, logger=ONNX_REGISTRY_LOGGER)
    caplog.set_level(logging.WARNING, logger=ONNXSCRIPT_FOLDING_LOGGER)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with known_exporter_messages_filtered():
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            logger.warning("something else the user should read")
            folding.warning("Skipping constant folding for op %s with multiple outputs.", "Split")
            folding.warning("folding failed for node 7")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("another deprecation", FutureWarning)
        logger.warning("torchvision is not installed. Skipping %s", "torchvision::roi_align")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something else the user should read", "folding failed for node 7", "torchvision is not installed. Skipping "
                        "torchvision::roi_align"]
    assert [str(w.message) for w in seen] == ["another deprecation"]
