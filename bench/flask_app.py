"""The Flask application of bench/bench.py: what a small JSON API does
(a route with a path parameter, a dict serialised by jsonify)."""
from flask import Flask, jsonify

app = Flask(__name__)


@app.route('/flask/item/<int:item_id>')
def item(item_id):
    return jsonify({'id': item_id, 'name': 'item %d' % item_id,
                    'tags': ['a', 'b', 'c'], 'price': item_id * 1.5,
                    'in_stock': item_id % 2 == 0})


application = app
