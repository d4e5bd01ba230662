"""Caption shards (LAION via laion_to_shards.py, or the demo data) -> LLaVA 558K-style
pretraining data: OUT/images/{shard}/{key}.jpg and OUT/pretrain.json with
{"id", "image", "conversations": [{"from": "human", "value": "...<image>..."}, {"from": "gpt",
"value": caption}]}, the layout LLaVA's feature-alignment stage reads.
"""

import argparse

from dtpclip.data import export_llava_pretrain


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shards", required=True, help="shard spec, e.g. 'data/{00000..00009}.tar'")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--json-name", default="pretrain.json")
    args = parser.parse_args(argv)
    print(f"wrote {export_llava_pretrain(args.shards, args.out, json_name=args.json_name)}")


if __name__ == "__main__":
    main()
