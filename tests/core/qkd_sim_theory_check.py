#!/usr/bin/env python3
"""qkd-sim's theory column follows what the run simulates: with an intercept-resend Eve on
every pulse the formulas give no key (the measured QBER, about 25 %, is above any bound),
and with a biased basis choice (Z with probability 0.9) the theory's sifted rate is the
measured one (z^2 + (1-z)^2 of the detections, not 1/2) and its secret rate is within 15 %
of the measured (key from the Z-Z detections, z^2).
Usage: qkd_sim_theory_check.py QKD_SIM"""
import json
import subprocess
import sys

sim = sys.argv[1]


def run(*args):
    out = subprocess.run([sim, "-n", "3", "--no-progress", "--json", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


failures = []
eve = run("--eve-fraction", "1")
if eve["theory"]["qber"] < 0.24:
    failures.append(f"Eve on every pulse: theory QBER {eve['theory']['qber']}")
if eve["theory"]["secret_per_pulse"] != 0:
    failures.append(f"Eve on every pulse: theory key {eve['theory']['secret_per_pulse']} > 0")

biased = run("--z-basis-prob", "0.9")
rate = biased["channel"]["pulse_rate_hz"]
sifted = biased["theory"]["sifted_per_pulse"] * rate
measured_sifted = biased["total"]["sifted_rate_per_s"]
if abs(measured_sifted / sifted - 1) > 0.03:
    failures.append(f"z 0.9: sifted measured {measured_sifted:.4g}/s, theory {sifted:.4g}/s")
secret = biased["theory"]["secret_per_pulse"]
measured_secret = biased["total"]["secret_per_pulse"]
if not 0.85 < measured_secret / secret < 1.15:
    failures.append(f"z 0.9: secret per pulse measured {measured_secret:.4g}, theory {secret:.4g}")

for f in failures:
    print("FAIL:", f)
print(f"{4 - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
