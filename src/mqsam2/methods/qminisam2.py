"""Q-MiniSAM2 (Ren et al.): uniform WbAb, block reconstruction (QDrop) with the Hierarchy-based Video
Quantization loss on the memory attention layers and the memory encoder (`mqsam2.reconstruct.hvq`); the
`-mkv` variant tracks with Adaptive Mutual-KV memory (`mqsam2.memory.mutual_kv`)."""

from mqsam2.methods.registry import Method, register

QMINISAM2 = register(
    Method(
        "qminisam2",
        "uniform, QDrop block reconstruction, HVQ triplet loss on the video units",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="qdrop",
        video_loss="hvq",
    )
)

QMINISAM2_MKV = register(
    Method(
        "qminisam2-mkv",
        "Q-MiniSAM2 tracking with Adaptive Mutual-KV memory",
        weight_observer="mse",
        act_observer="mse",
        reconstruction="qdrop",
        video_loss="hvq",
        memory_policy="mutual-kv",
    )
)
