"""Stop 62: timm models no one had run through fxprune, through the users' flow (``user_models.run``: a plain loop,
``fp.squeeze_release`` with its defaults and 2 cycles) in one process, one after another. They are now in
``benchmarks/user_models.py``'s list as ``timm_mobilenetv4``, ``timm_resnest``... (GhostNet-V2 and HaloNet are not:
the models themselves raise at 32x32 pixels, before fxprune runs). Output: ``user_models_stop62_new_953c0a0.txt``.

    OMP_NUM_THREADS=1 python benchmarks/results/user_models/new_models_stop62.py n_mnv4 n_resnest ...
"""
import sys, json, time, traceback
sys.path.insert(0, str(__import__('pathlib').Path(__file__).parents[2]))
import user_models as um
NEW = {"n_mnv4": ("mobilenetv4_conv_small", {}), "n_resnest": ("resnest14d", {}),
       "n_res2net": ("res2net50_14w_8s", {}), "n_ghostv2": ("ghostnetv2_100", {}),
       "n_repghost": ("repghostnet_050", {}), "n_tinynet": ("tinynet_e", {}),
       "n_effvit_b0": ("efficientvit_b0", {}), "n_regnety": ("regnety_002", {}),
       "n_mixnet": ("mixnet_s", {}), "n_selecsls": ("selecsls42b", {}),
       "n_halonet": ("halonet26t", dict(img_size=32)), "n_gcvit": ("gcvit_xxtiny", dict(img_size=32)),
       "n_sequencer": ("sequencer2d_s", {}), "n_cs3": ("cs3darknet_focus_s", {}),
       "n_fasternet": ("fasternet_t0", {}), "n_hgnet": ("hgnet_tiny", {})}
um.TIMM.update(NEW)
for name in sys.argv[1:]:
    t = time.time()
    try:
        r = um.run(name)
        print(f"{name:14s} {NEW[name][0]:24s} {r['params'][0]:>10,} -> {r['params'][1]:>10,} {r['params'][0]/r['params'][1]:6.2f}x acc {r['accuracy']} own {r['own_class']} lat {r['latency_ms']} {time.time()-t:.0f}s", flush=True)
        for w in r['warnings']: print("    ", w, flush=True)
    except Exception as e:
        print(f"{name:14s} FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
        traceback.print_exc(file=sys.stdout)
