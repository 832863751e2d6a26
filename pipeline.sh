#!/usr/bin/env bash
# SPPO over N iterations: generate -> rank -> train, iteration t+1 sampling from and referencing iteration t's model.
#
#   ./pipeline.sh --model M --prompts P --iter N --output-dir D [--recipe YAML] [--ranker R] [--num-samples K]
#                 (--ranker R judges the rankings and the evaluations)
#                 [--generate-args "..."] [--rank-args "..."] [--train-args "..."]
#                 [--eval-prompts E [--eval-args "..."] [--eval-command "CMD"]]
#                 [--push-to-hub ORG/NAME [--hub-revision-per-iteration] [--public]]
#                 [--num-nodes N --node-rank R --master-addr ADDRESS [--master-port PORT]]
#
# Layout: D/iter1/{generations,rankings,model}, D/iter2/..., one directory per iteration and stage.
# --recipe passes a YAML recipe (recipes/*.yaml) to every stage; the other options override it.
# A {iter} in --prompts is replaced by the iteration number (the paper uses a disjoint set of prompts per iteration).
# --eval-prompts: after each iteration, `sppo eval` judges model t on these held-out prompts against the base model
# (D/iter{t}/eval; the base model's responses are sampled once, in D/iter0/eval) and against model t-1
# (D/iter{t}/eval-previous); --eval-args go to sppo eval. --eval-command runs your own evaluation too, with {model},
# {iter} and {output} filled in; its output is kept in D/iter{t}/eval-command. D/report.md and D/report.png are
# rebuilt after each iteration (sppo report D). Training and evaluation runs are named iter{t}-train, iter{t}-eval
# for the trackers, in the group WANDB_RUN_GROUP (the output directory's name unless set).
# --push-to-hub publishes each iteration as ORG/NAME-generations-iter{t}, ORG/NAME-rankings-iter{t} and the model
# ORG/NAME-SPPO-Iter{t}, each model's card naming the one before as its base (or ORG/NAME-SPPO at revision iter{t}
# with --hub-revision-per-iteration, each card naming --model as its base when that is a hub id).
# --num-nodes: run the same command on each of N nodes, with its --node-rank (recipes/slurm/sppo.sbatch does): every
# node generates and ranks a slice of the prompts (sppo's --num-shards/--shard-index), node 0 merges the slices and the
# others wait for it, all N train together (torchrun through node 0, at --master-addr), and node 0 alone evaluates,
# reports and publishes. --output-dir must be on storage every node sees.
# Every stage is safe to re-run: a finished stage with the same settings and inputs says so and is skipped, an
# interrupted one resumes, and one whose settings changed is refused (sppo's own rules, see the README). So re-running
# the same command after a crash continues where it stopped.
set -euo pipefail

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "pipeline.sh: error: $*" >&2; exit 2; }

model="" prompts="" iterations="" output_dir="" recipe=() eval_prompts="" eval_command=""
generate_args="" rank_args="" train_args="" eval_args="" hub="" per_revision="" public=()
nodes=1 node_rank=0 master_addr="" master_port=29500
while [[ $# -gt 0 ]]; do
  [[ $1 == --help || $1 == -h ]] && usage
  case $1 in
    --hub-revision-per-iteration) per_revision=1; shift; continue ;;
    --public) public=(--public); shift; continue ;;
  esac
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case $1 in
    --model) model=$2 ;;
    --prompts) prompts=$2 ;;
    --iter) iterations=$2 ;;
    --output-dir) output_dir=$2 ;;
    --recipe) [[ -f $2 ]] || die "no such recipe: $2"; recipe=(--config "$2") ;;
    --ranker) rank_args+=" --ranker $2"; eval_args+=" --ranker $2" ;;
    --num-samples) generate_args+=" --num-samples $2" ;;
    --generate-args) generate_args+=" $2" ;;
    --rank-args) rank_args+=" $2" ;;
    --train-args) train_args+=" $2" ;;
    --eval-prompts) eval_prompts=$2 ;;
    --eval-args) eval_args+=" $2" ;;
    --eval-command) eval_command=$2 ;;
    --push-to-hub) hub=$2 ;;
    --num-nodes) nodes=$2 ;;
    --node-rank) node_rank=$2 ;;
    --master-addr | --main-process-ip) master_addr=$2 ;;
    --master-port | --main-process-port) master_port=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done
[[ -n $model && -n $prompts && -n $iterations && -n $output_dir ]] ||
  die "--model, --prompts, --iter and --output-dir are required (see --help)"
[[ $iterations =~ ^[1-9][0-9]*$ ]] || die "--iter must be a positive integer, got '$iterations'"
[[ -z $eval_command || -n $eval_prompts ]] || die "--eval-command goes with --eval-prompts"
[[ -n $hub || (-z $per_revision && ${#public[@]} -eq 0) ]] || die "--hub-revision-per-iteration and --public go with --push-to-hub"
[[ $nodes =~ ^[1-9][0-9]*$ && $node_rank =~ ^[0-9]+$ && $node_rank -lt $nodes ]] ||
  die "--num-nodes must be a positive integer and --node-rank below it, got $nodes and $node_rank"
[[ $nodes -eq 1 || -n $master_addr ]] || die "--num-nodes above 1 needs --master-addr, the address of node 0"
slice=() lead=1  # several nodes: this node's slice of the prompts; node 0 leads (merges, evaluates, publishes)
if ((nodes > 1)); then
  slice=(--num-shards "$nodes" --shard-index "$node_rank")
  train_args+=" --num-nodes $nodes --node-rank $node_rank --master-addr $master_addr --master-port $master_port"
  ((node_rank == 0)) || lead=""
fi
export WANDB_RUN_GROUP=${WANDB_RUN_GROUP:-$(basename "$output_dir")}
sppo=${SPPO:-sppo}
command -v "$sppo" > /dev/null || die "'$sppo' not found: install the package (make install) or set SPPO"

stage() {  # stage NAME OUTPUT COMMAND...
  echo "== $1 -> $2"
  shift 2
  "$@"
}

sliced() {  # sliced NAME OUTPUT COMMAND...: on several nodes, each does its slice, node 0 merges and the others wait
  if ((nodes == 1)); then
    stage "$@"
  elif [[ -n $lead ]]; then
    stage "$@" "${slice[@]}"
    stage "$@"
  else
    stage "$@" "${slice[@]}" --wait-for-merge
  fi
}

# shellcheck disable=SC2086 # the *_args options are word-split on purpose
sppo_eval() {  # sppo_eval OUTPUT MODEL BASELINE RUN_NAME [sppo eval options...]
  local output=$1 evaluated=$2 baseline=$3 name=$4; shift 4
  stage eval "$output" "$sppo" eval ${recipe[@]+"${recipe[@]}"} --model "$evaluated" --baseline "$baseline" \
    --output "$output" --run-name "$name" "$@" $eval_args
}

publish() {  # publish OUTPUT REPO_ID [sppo push options...]: with --push-to-hub only
  [[ -n $hub ]] || return 0
  echo "== push $1 -> $2"
  "$sppo" push "$1" --repo-id "$2" ${public[@]+"${public[@]}"} "${@:3}"
}

model_repo() {  # model_repo ITERATION: the repository (and revision) of iteration t's model
  if [[ -n $per_revision ]]; then echo "$hub-SPPO --revision iter$1"; else echo "$hub-SPPO-Iter$1"; fi
}

user_eval() {  # user_eval ITERATION MODEL: run --eval-command once per iteration and model, keeping its output
  local dir=$output_dir/iter$1/eval-command command=$eval_command done
  command=${command//\{model\}/"$(printf %q "$2")"}
  command=${command//\{iter\}/"$1"}
  command=${command//\{output\}/"$(printf %q "$dir")"}
  done="$command"$'\n'"model manifest: $(cksum < "$2/manifest.json")"  # a retrained model is evaluated again
  if [[ -f $dir/done ]]; then
    [[ $(cat "$dir/done") == "$done" ]] ||
      die "$dir holds the output of another --eval-command or model; remove it to run it again"
    echo "== eval-command: $dir is done"
    return
  fi
  echo "== eval-command -> $dir"
  mkdir -p "$dir"
  bash -c "$command" > "$dir/output.log" 2>&1 || die "--eval-command failed (exit $?); its output: $dir/output.log"
  printf '%s' "$done" > "$dir/done"
}

if [[ -n $eval_prompts && -n $lead ]]; then  # the base model against itself: exactly 1/2, and its responses, once
  sppo_eval "$output_dir/iter0/eval" "$model" "$model" iter0-eval --prompts "$eval_prompts"
fi
policy=$model
for ((t = 1; t <= iterations; t++)); do
  dir=$output_dir/iter$t
  echo "=== iteration $t/$iterations: policy $policy"
  # shellcheck disable=SC2086 # the *_args options are word-split on purpose
  sliced generate "$dir/generations" "$sppo" generate ${recipe[@]+"${recipe[@]}"} --model "$policy" \
    --prompts "${prompts//\{iter\}/$t}" --output "$dir/generations" $generate_args
  # shellcheck disable=SC2086
  sliced rank "$dir/rankings" "$sppo" rank ${recipe[@]+"${recipe[@]}"} --generations "$dir/generations" \
    --output "$dir/rankings" $rank_args
  # shellcheck disable=SC2086
  stage train "$dir/model" "$sppo" train ${recipe[@]+"${recipe[@]}"} --model "$policy" --data "$dir/rankings" \
    --output "$dir/model" --run-name "iter$t-train" $train_args
  policy=$dir/model
  [[ -n $lead ]] || continue  # evaluation, publishing and the report are node 0's
  evals=()
  if [[ -n $eval_prompts ]]; then
    sppo_eval "$dir/eval" "$policy" "$output_dir/iter0/eval" "iter$t-eval"
    ((t == 1)) || sppo_eval "$dir/eval-previous" "$dir/eval" "$output_dir/iter$((t - 1))/eval" "iter$t-eval-previous"
    [[ -z $eval_command ]] || user_eval "$t" "$policy"
    evals=(--eval "$dir/eval")
  fi
  publish "$dir/generations" "$hub-generations-iter$t"
  publish "$dir/rankings" "$hub-rankings-iter$t"
  if [[ -n $hub ]]; then
    # the card's base model: the iteration before, in its own repository; else --model, when that is a hub id (one
    # repository with a revision per iteration cannot name its own earlier revision as a base model)
    base=()
    if ((t > 1)) && [[ -z $per_revision ]]; then base=(--base-model "$hub-SPPO-Iter$((t - 1))")
    elif [[ ! -e $model ]]; then base=(--base-model "$model"); fi
    # shellcheck disable=SC2046 # model_repo's words are the repository and, per revision, its --revision
    publish "$policy" $(model_repo "$t") --dataset "$hub-rankings-iter$t" ${base[@]+"${base[@]}"} ${evals[@]+"${evals[@]}"}
  fi
  "$sppo" report "$output_dir" || echo "pipeline.sh: warning: the report could not be rebuilt (see above)" >&2
done
echo "=== done: final model $policy"
