"""The speed bench runs end to end on tiny sizes and reports every figure (it prints numbers; no thresholds)."""

from robustbench_knn.config import get_model_config
from robustbench_knn.evaluation.bench import run_bench


def test_bench_reports_knn_and_attack_pairs():
    cfg = get_model_config("full").replace(model={"w_r": 16, "d": 3}, train={"batch_size": 64}, k=20)
    res = run_bench(cfg, device="cpu", repeats=1, n_test=100, n_bank=2000, attack_batch=8, attack_steps=2)
    for key in ("knn_exact_seconds", "knn_fast_seconds", "knn_dense_seconds", "knn_speedup", "kfgsm_image_steps_per_second",
                "ta_bim_image_steps_per_second", "kfgsm_vs_ta_bim", "apgd_core_image_steps_per_second",
                "aa_apgd_ce_image_steps_per_second", "apgd_core_vs_aa_apgd_ce"):
        assert res[key] > 0, key
    assert res["kfgsm_vs_ta_bim"] == res["kfgsm_image_steps_per_second"] / res["ta_bim_image_steps_per_second"]
