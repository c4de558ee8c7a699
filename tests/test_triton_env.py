"""The interpreter set-up holds whatever the user imported first."""
import os
import subprocess
import sys
import textwrap


def test_triton_kernels_work_when_torchvision_was_imported_first():
    # torchvision imports triton itself; fastbone must still run its kernels (and triton's
    # library functions they call) through the interpreter, with correct results.
    script = textwrap.dedent("""
        import torchvision, torch
        import fastbone
        from fastbone.ops import conv_bias_act, max_pool2d, global_avg_pool
        torch.manual_seed(0)
        x = torch.randn(2, 5, 11, 9)
        w = torch.randn(7, 5, 3, 3)
        b = torch.randn(7)
        with fastbone.backend("triton"):
            y = conv_bias_act(x, w, b, padding=1, act="relu")
            p = max_pool2d(y, 3, 2, 1)
            g = global_avg_pool(p)
        ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1))
        ref_p = torch.nn.functional.max_pool2d(ref, 3, 2, 1)
        assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
        assert ((p.double() - ref_p).norm() / ref_p.norm()) < 1e-5
        assert ((g.double() - ref_p.mean((2, 3), keepdim=True)).norm() / ref_p.norm()) < 1e-5
        print("ok")
    """)
    # A fresh process as a user starts it: not even the interpreter flag this test process set.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
