"""The exported video tracker's files and the tensor names between them, shared by the export
(`mqsam2.deploy.onnx.video`, PyTorch) and the host driver (`mqsam2.deploy.onnx.tracker`, numpy only)."""

FRAME_ENCODER_FILE = "frame_encoder.onnx"
DECODER_FILES = {False: "decoder_single.onnx", True: "decoder_multi.onnx"}  # keyed by multimask_output
MEMORY_ATTENTION_FILE, MEMORY_ENCODER_FILE = "memory_attention.onnx", "memory_encoder.onnx"
TRACKER_FILE = "tracker.json"
GRAPH_FILES = (FRAME_ENCODER_FILE, *DECODER_FILES.values(), MEMORY_ATTENTION_FILE, MEMORY_ENCODER_FILE)
FRAME_ENCODER_OUTPUTS = ("vision_feats", "vision_pos", "high_res_feats_0", "high_res_feats_1")
DECODER_INPUTS = ("pix_feat", "high_res_feats_0", "high_res_feats_1", "point_coords", "point_labels")
DECODER_OUTPUTS = ("low_res_masks", "high_res_masks", "obj_ptr", "object_score_logits")
MEMORY_ATTENTION_INPUTS = ("curr", "curr_pos", "memory", "memory_pos", "obj_ptrs", "obj_ptr_tpos")
MEMORY_ENCODER_INPUTS = ("vision_feats", "mask_logits", "object_score_logits")
