"""The inference application, ``detkit infer``: a trained (or exported) detector run on images, folders,
videos and webcams, writing annotated pictures and videos and the detections as COCO results (``predictor``).
It sits on top of the library: it uses the models (tiled inference is ``detkit.models.tiling``), the media I/O
of ``detkit.data.media`` and the drawing of ``detkit.evaluation.drawing``, and no lower layer imports it."""
