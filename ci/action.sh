#!/usr/bin/env bash
# The logic of ci/action.yml: a GitHub Action with docker/build-push-action's inputs and
# outputs that builds with rbuild. Runs anywhere (tests drive it directly):
#
#   INPUT_CONTEXT=. INPUT_TAGS=reg.example/app:1 INPUT_PUSH=true GITHUB_OUTPUT=out.txt ci/action.sh
#
# Inputs are INPUT_<NAME> environment variables, NAME upper-case with '-' as '_'
# (INPUT_BUILD_ARGS; the runner's own INPUT_BUILD-ARGS form is read too). List inputs are
# split like build-push-action's: tags and platforms at newlines and commas; build-args,
# labels, annotations, outputs, cache-from, cache-to, secrets, secret-files, secret-envs, build-contexts
# at newlines only. An item may be double-quoted ("a,b" or a value spanning lines; "" is a
# quote). Outputs (imageid, digest, metadata) are appended to $GITHUB_OUTPUT, multi-line
# values in the `name<<DELIMITER` form; without $GITHUB_OUTPUT they are printed.
#
# Secrets (`ID=VALUE` lines) reach rbuild as environment variables of its process only
# (`--secret id=ID,env=...`): never written to a file, never on a command line, never printed.
set -euo pipefail
set +x

die() {
  echo "::error::rbuild action: $*" >&2
  exit 1
}

# input NAME: the value of input NAME ('' when unset).
input() {
  local up=${1^^}
  local var="INPUT_${up//-/_}"
  if [ -n "${!var+x}" ]; then
    printf '%s' "${!var}"
  else
    printenv "INPUT_$up" || true
  fi
}

# input_bool NAME: true when the input says true (any case), as build-push-action reads it.
input_bool() {
  [[ "$(input "$1")" =~ ^[[:space:]]*[Tt][Rr][Uu][Ee][[:space:]]*$ ]]
}

# parse_list TEXT NEWLINES_ONLY: splits TEXT into the array LIST (see above). Whitespace
# around unquoted items is dropped, and so are empty items.
parse_list() {
  local text=${1//$'\r'/} only_nl=$2
  local n=${#text} i c item="" in_quotes=0 quoted=0
  LIST=()
  for ((i = 0; i < n; i++)); do
    c=${text:i:1}
    if ((in_quotes)); then
      if [[ $c == '"' ]]; then
        if [[ ${text:i+1:1} == '"' ]]; then
          item+='"'
          i=$((i + 1))
        else
          in_quotes=0
        fi
      else
        item+=$c
      fi
    elif [[ $c == '"' && -z ${item//[[:space:]]/} ]]; then
      # A quote opens an item only at its start (relaxed quotes elsewhere, as csv-parse).
      in_quotes=1 quoted=1 item=""
    elif [[ $c == $'\n' || ($c == ',' && $only_nl == 0) ]]; then
      push_item
    else
      item+=$c
    fi
  done
  ((in_quotes == 0)) || die "an input has an unterminated double quote"
  push_item
}

push_item() {
  if ((quoted == 0)); then
    item="${item#"${item%%[![:space:]]*}"}"
    item="${item%"${item##*[![:space:]]}"}"
  fi
  [ -z "$item" ] || LIST+=("$item")
  item="" quoted=0
}

# set_output NAME VALUE
set_output() {
  local name=$1 value=$2 delim
  if [ -z "${GITHUB_OUTPUT:-}" ]; then
    printf '%s=%s\n' "$name" "$value"
    return
  fi
  if [[ $value == *$'\n'* || $value == *$'\r'* ]]; then
    delim="ghadelimiter_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    [[ $value != *"$delim"* ]] || die "output $name contains its delimiter"
    printf '%s<<%s\n%s\n%s\n' "$name" "$delim" "$value" "$delim" >>"$GITHUB_OUTPUT"
  else
    printf '%s=%s\n' "$name" "$value" >>"$GITHUB_OUTPUT"
  fi
}

rbuild=$(input rbuild)
rbuild=${rbuild:-rbuild}
command -v "$rbuild" >/dev/null || die "rbuild ($rbuild) is not installed or not executable; set the input 'rbuild' to its path"

context=$(input context)
args=(build --progress=plain)

file=$(input file)
[ -z "$file" ] || args+=(--file "$file")
target=$(input target)
[ -z "$target" ] || args+=(--target "$target")
input_bool no-cache && args+=(--no-cache)
input_bool push && args+=(--push)
if input_bool load; then
  die "load: rbuild has no daemon to load the image into; use outputs: type=docker,dest=image.tar (then docker load or podman load)"
fi

parse_list "$(input platforms)" 0
if ((${#LIST[@]} > 0)); then
  platforms=$(IFS=,; echo "${LIST[*]}")
  args+=(--platform "$platforms")
fi

# Provenance as build-push-action attaches it: `true` = mode=max, `false` = none, other
# values as --attest type=provenance takes them; the run's URL as builder-id unless given.
# Unset: a default, unless BUILDX_NO_DEFAULT_ATTESTATIONS is set or the image goes to a
# docker archive: mode=min for a private repository (or where that is not known), max for a
# public one.
builder_id=""
if [ -n "${GITHUB_SERVER_URL:-}" ] && [ -n "${GITHUB_REPOSITORY:-}" ] && [ -n "${GITHUB_RUN_ID:-}" ]; then
  builder_id="$GITHUB_SERVER_URL/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID"
fi
with_builder() {
  if [ -n "$builder_id" ] && [[ $1 != *builder-id=* ]]; then echo "$1,builder-id=$builder_id"; else echo "$1"; fi
}
provenance=$(input provenance)
case ${provenance,,} in
  true) args+=(--provenance "$(with_builder mode=max)") ;;
  false) ;;
  "")
    no_default=${BUILDX_NO_DEFAULT_ATTESTATIONS:-}
    if [[ -z $no_default || ${no_default,,} =~ ^(0|false)$ ]] && [[ $(input outputs) != *type=docker* ]]; then
      if [ "$(input repo-private)" = false ]; then
        args+=(--provenance "$(with_builder mode=max)")
      else
        args+=(--provenance "$(with_builder mode=min)")
      fi
    fi ;;
  *) args+=(--provenance "$(with_builder "$provenance")") ;;
esac
sbom=$(input sbom)
case ${sbom,,} in
  "" | false) ;;
  true) args+=(--sbom true) ;;
  *) die "sbom: ${sbom@Q}: rbuild scans the image itself (true or false; no generator image)" ;;
esac

parse_list "$(input tags)" 0
for t in ${LIST[@]+"${LIST[@]}"}; do args+=(--tag "$t"); done
parse_list "$(input build-args)" 1
for a in ${LIST[@]+"${LIST[@]}"}; do args+=(--build-arg "$a"); done
parse_list "$(input labels)" 1
for l in ${LIST[@]+"${LIST[@]}"}; do args+=(--label "$l"); done
parse_list "$(input annotations)" 1
for a in ${LIST[@]+"${LIST[@]}"}; do args+=(--annotation "$a"); done
parse_list "$(input outputs)" 1
for o in ${LIST[@]+"${LIST[@]}"}; do args+=(--output "$o"); done
parse_list "$(input build-contexts)" 1
for b in ${LIST[@]+"${LIST[@]}"}; do args+=(--build-context "$b"); done
# Only when given: a build without them needs no support for cache import/export.
parse_list "$(input cache-from)" 1
for c in ${LIST[@]+"${LIST[@]}"}; do args+=(--cache-from "$c"); done
parse_list "$(input cache-to)" 1
for c in ${LIST[@]+"${LIST[@]}"}; do args+=(--cache-to "$c"); done

# Secrets. The values go into this shell's environment (exported: seen by rbuild, which is
# started below and reads them once), never into a file or an argument.
valid_id() { [[ $1 =~ ^[A-Za-z0-9_.-]+$ ]]; }
n=0
parse_list "$(input secrets)" 1
for s in ${LIST[@]+"${LIST[@]}"}; do
  [[ $s == *=* ]] || die "secrets: an item is not ID=VALUE (the value is not shown)"
  id=${s%%=*}
  valid_id "$id" || die "secrets: bad secret id ${id@Q} (letters, digits, '_', '.', '-')"
  n=$((n + 1))
  export "RBUILD_ACTION_SECRET_$n=${s#*=}"
  args+=(--secret "id=$id,env=RBUILD_ACTION_SECRET_$n")
done
parse_list "$(input secret-files)" 1
for s in ${LIST[@]+"${LIST[@]}"}; do
  [[ $s == *=* ]] || die "secret-files: ${s@Q} is not ID=PATH"
  valid_id "${s%%=*}" || die "secret-files: bad secret id ${s%%=*}"
  args+=(--secret "id=${s%%=*},src=${s#*=}")
done
parse_list "$(input secret-envs)" 1
for s in ${LIST[@]+"${LIST[@]}"}; do
  [[ $s == *=* ]] || die "secret-envs: ${s@Q} is not ID=VARIABLE"
  valid_id "${s%%=*}" || die "secret-envs: bad secret id ${s%%=*}"
  args+=(--secret "id=${s%%=*},env=${s#*=}")
done
unset LIST s

work=$(mktemp -d "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/rbuild-action.XXXXXX")
trap 'rm -rf "$work"' EXIT
args+=(--iidfile "$work/iid" --metadata-file "$work/metadata.json" "${context:-.}")

echo "::group::rbuild ${args[*]@Q}"
status=0
"$rbuild" "${args[@]}" || status=$?
echo "::endgroup::"
[ "$status" = 0 ] || die "the build failed (exit status $status)"

imageid=$(cat "$work/iid")
metadata=$(cat "$work/metadata.json")
digest=$(sed -n 's/^ *"containerimage\.digest": *"\([^"]*\)".*/\1/p' "$work/metadata.json" | head -n 1)
set_output imageid "$imageid"
set_output digest "$digest"
set_output metadata "$metadata"
