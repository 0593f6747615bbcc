#!/bin/sh
# Build the binary sentiment task from the movie-review snippets.
#
# Usage: scripts/prepare-sentiment.sh SRC_DIR OUT_DIR
#
# Reads SRC_DIR/movieReviewSnippets_GroundTruth.txt (TSV without a header: id, mean
# rating in [-4, 4], text; CRLF line endings) and writes OUT_DIR/train.tsv and
# OUT_DIR/test.tsv, each with the header "text<TAB>label":
#   - label "positive" when the rating is above 0, "negative" when below 0;
#     rows rated exactly 0 are dropped;
#   - of the kept rows, counted from 0 in file order, row i goes to test when
#     i % 5 == 4 and to train otherwise (an 80/20 split that never changes).
# Texts are copied byte for byte (quotes included): the files are plain TSV with no
# quoting, so a reader must split on tabs and treat '"' as an ordinary character.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 SRC_DIR OUT_DIR" >&2
    exit 2
fi
src="$1/movieReviewSnippets_GroundTruth.txt"
out_dir=$2
if [ ! -f "$src" ]; then
    echo "error: $src does not exist" >&2
    exit 2
fi
mkdir -p "$out_dir"

# Temporary files live in OUT_DIR so that the final mv is a rename on one file system.
tmp_train=$(mktemp "$out_dir/.train.tsv.XXXXXX")
tmp_test=$(mktemp "$out_dir/.test.tsv.XXXXXX")
trap 'rm -f "$tmp_train" "$tmp_test"' EXIT
trap 'exit 1' HUP INT TERM

# Byte semantics: the texts are UTF-8 and pass through untouched.
LC_ALL=C awk -F '\t' -v train="$tmp_train" -v test="$tmp_test" -v src="$src" '
function fail(msg) {
    print "error: " src ":" NR ": " msg | "cat 1>&2"
    failed = 1
    exit 1
}
BEGIN {
    printf "text\tlabel\n" > train
    printf "text\tlabel\n" > test
}
{
    sub(/\r$/, "")
    if (NF != 3)
        fail("expected 3 tab-separated fields (id, rating, text), found " NF)
    if ($2 !~ /^-?[0-9]+(\.[0-9]+)?$/)
        fail("rating is not a number: \"" $2 "\"")
    if ($3 ~ /^ *$/)
        fail("empty text")

    rating = $2 + 0
    if (rating > 0)
        label = "positive"
    else if (rating < 0)
        label = "negative"
    else {
        dropped++
        next
    }

    if (kept % 5 == 4) {
        printf "%s\t%s\n", $3, label > test
        n_test++
    } else {
        printf "%s\t%s\n", $3, label > train
        n_train++
    }
    kept++
}
END {
    if (failed)
        exit 1
    if (close(train) != 0 || close(test) != 0)
        fail("could not write the output files")
    printf "%d train rows, %d test rows, %d rows rated 0 dropped\n", \
        n_train, n_test, dropped | "cat 1>&2"
}
' "$src"

chmod 644 "$tmp_train" "$tmp_test"
mv "$tmp_train" "$out_dir/train.tsv"
mv "$tmp_test" "$out_dir/test.tsv"
