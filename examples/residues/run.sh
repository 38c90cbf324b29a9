#!/usr/bin/env bash
# Counts the residues of each chain in every PDB file of the job.
# A residue is a distinct (chain, residue number, insertion code) among ATOM records.
# Output: residues.tsv with one line per file and chain.
set -euo pipefail
shopt -s nullglob
pdbs=(*.pdb)
if [ ${#pdbs[@]} -eq 0 ]; then
  echo "no .pdb file in the job" >&2
  exit 2
fi
{
  printf 'file\tchain\tresidues\n'
  for pdb in "${pdbs[@]}"; do
    awk -v file="$pdb" '
      substr($0, 1, 6) == "ATOM  " {
        chain = substr($0, 22, 1); residue = substr($0, 23, 5)
        if (!((chain, residue) in seen)) { seen[chain, residue] = 1; count[chain]++ }
      }
      END { for (chain in count) printf "%s\t%s\t%d\n", file, chain, count[chain] }
    ' "$pdb" | sort
  done
} > residues.tsv
echo "counted residues in ${#pdbs[@]} file(s)"
