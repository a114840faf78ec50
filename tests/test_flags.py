"""flags.py: DeiT's underscore spellings in every parser, the defaults that depend on the method,
--help with its defaults and a help string that says what each flag does, and the recipe line
built from its parts. Every bad flag's one error line is tested with the program that reads it
(tests/test_train.py, tests/test_eval.py)."""

import argparse

import pytest

import eval as ev
import teacher
from errors import UsageError
from flags import describe_recipe, get_args_parser, resolve_defaults
from moe import METHODS, MODELS


def test_every_parser_takes_deits_underscore_spellings():
    train_flags = "--batch_size 8 --data_path X --num_workers 3 --output_dir O --drop_path 0.2"
    args = get_args_parser().parse_args(train_flags.split())
    assert (args.batch_size, args.data_path, args.num_workers) == (8, "X", 3)
    assert (args.output_dir, args.drop_path) == ("O", 0.2)
    eval_flags = "--checkpoint c.pt --data_path X --batch_size 8 --num_workers 2 --data_set folder"
    opts = ev.get_args_parser().parse_args(eval_flags.split())
    assert (opts.data_path, opts.batch_size, opts.num_workers, opts.data) == ("X", 8, 2, "folder")
    dashed = ev.get_args_parser().parse_args("--checkpoint c.pt --data-path X".split())
    assert dashed.data_path == opts.data_path
    shown = teacher.get_args_parser().parse_args("t.pth --img_size 32 --patch_size 4".split())
    assert (shown.img_size, shown.patch_size) == (32, 4)


def test_help_shows_the_defaults():
    text = get_args_parser().format_help()
    flat = " ".join(text.split()).replace("0.0005", "5e-04")  # argparse wraps the lines
    for shown in ("(default: 300)", "(default: synthetic)", "(default: 0.8)", "(default: 5e-04)"):
        assert shown in flat, shown
    assert "--data_path" in text  # the aliases are listed beside the dashed names


@pytest.mark.parametrize(
    "flags, want",
    [
        ("", dict(experts=16, topk=1, student_balance_coef=0.005, eval_capacity_factor=4.0)),
        ("--method tgr", dict(student_balance_coef=0.0, eval_capacity_factor=4.0)),
        ("--method lossfree", dict(student_balance_coef=0.0, eval_capacity_factor=4.0)),
        ("--method expert-choice --capacity-factor 1.5", dict(eval_capacity_factor=1.5)),
        ("--method m2ot --teachers a.pt", dict(experts=8, topk=2, moe_layers=[2, 4, 6, 8, 10, 12])),
        ("--model micro --method m2ot --teachers a.pt", dict(expert_hidden=192, model_ema=False)),
        # the device's: a GPU step is compiled and RandAugments its batch, a CPU's is not
        ("--device cuda", dict(compile=True, aa_on_device=True)),
        ("--device cuda:1 --no-compile --no-aa-on-device", dict(compile=False, aa_on_device=False)),
        ("--device cpu", dict(compile=False, aa_on_device=False)),
        ("--device cpu --compile --aa-on-device", dict(compile=True, aa_on_device=True)),
    ],
)
def test_defaults_that_depend_on_the_method(flags, want, monkeypatch):
    monkeypatch.setattr("flags.TRITON", True)  # as torch's CUDA wheels
    args = get_args_parser().parse_args(flags.split())
    resolve_defaults(args)
    assert {k: getattr(args, k) for k in want} == want


def test_a_gpu_without_triton_runs_eagerly_unless_asked(monkeypatch):
    """inductor compiles GPU code with Triton: without it the default is eager (no crash at
    the first step), and an explicit --compile is left to torch's own message."""
    monkeypatch.setattr("flags.TRITON", False)
    for argv, want in (("--device cuda", False), ("--device cuda --compile", True)):
        args = get_args_parser().parse_args(argv.split())
        resolve_defaults(args)
        assert args.compile is want and args.aa_on_device, argv


def test_the_recipe_line_is_built_from_its_parts():
    args = get_args_parser().parse_args("--method tgr --device cpu".split())
    resolve_defaults(args)
    args.base_lr = 6.25e-5
    line = describe_recipe(args)
    assert line.startswith("recipe: AdamW lr 6.25e-05 (= 0.0005 × 64·world/512), wd 0.05")
    assert "; aa rand-m9-mstd0.5-inc1, reprob 0.25," in line
    assert "mixup 0.8, cutmix 1.0, smoothing 0.1" in line
    assert line.endswith("capacity factor 1.05 train / 4.0 eval")
    args.compile = True  # a CUDA run's default: the first steps wait for the compiler
    assert describe_recipe(args).endswith("4.0 eval, compiled (--no-compile: eager)")
    students = get_args_parser().parse_args("--method m2ot --teachers a.pt b.pt".split())
    resolve_defaults(students)
    students.base_lr = 6.25e-5
    line = describe_recipe(students)
    assert "mixup" not in line and "smoothing" not in line  # no labels: nothing to mix
    assert line.endswith("; 2 teachers, no labels, λ_1 (tas) 0.5, λ_2 (switch) 0.01")


def test_usage_error_is_a_value_error():
    """One class for every user mistake; `run_cli` turns ValueError and OSError into a line."""
    assert issubclass(UsageError, ValueError)


def test_teacher_layers_take_block_numbers_or_final(capsys):
    parser = get_args_parser()
    assert parser.parse_args(["--teacher-layers", "4", "final"]).teacher_layers == [4, "final"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--teacher-layers", "last"])
    assert "a block number or final" in capsys.readouterr().err


def test_every_help_string_says_what_the_flag_does():
    """Every flag of train.py and eval.py says in words what it does, not only which method
    reads it; --method names every method and --model every size."""
    for parser in (get_args_parser(), ev.get_args_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag, words = action.option_strings[0], (action.help or "").split()
            assert len(words) >= 3, f"{flag}: {action.help!r}"
            assert action.help.strip(" .:") not in METHODS, f"{flag}: {action.help!r}"
    helps = {a.dest: a.help for a in get_args_parser()._actions}
    assert all(f"{method} (" in helps["method"] for method in METHODS)
    assert all(f"{model} (" in helps["model"] for model in MODELS)


def test_the_watch_set_flags_keep_their_older_names():
    """--watch-size / --watch-every were --probe-size / --probe-every: scripts written before
    the rename run unchanged, in train.py and in eval.py."""
    args = get_args_parser().parse_args(["--probe-size", "32", "--probe-every", "5"])
    assert (args.watch_size, args.watch_every) == (32, 5)
    opts = ev.get_args_parser().parse_args(["--checkpoint", "c.pt", "--probe_size", "8"])
    assert opts.watch_size == 8
