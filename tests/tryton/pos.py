"""Sells through Tryton's point of sale, as a shop's till does, for the
e2e test `tests/e2e/tryton.rs` (issue 16).

Runs Tryton in-process through proteus: the same RPC entry points, access
checks and transaction retries as a client, without the per-call password
hashing of XML-RPC. The database is the site's PostgreSQL (database
TRYTON_DB, default `postgres`), set through TRYTOND_DATABASE__URI by the
caller. With TRYTON_URL set (`http://host:8000/DB/rpc/`) it goes through
that Tryton server's XML-RPC instead, logged in once as TRYTON_USER
(admin) with TRYTON_PASSWORD, as a till does: the compose stack's
`tryton-site sell` (docker/tryton/tryton-site.sh).
The seed creates one POS per name in TRYTON_SITES (comma-separated;
default main,shop1,shop2).

    pos.py seed YEAR              the head office: company, chart, fiscal
                                  year YEAR, tax, two products, one POS per
                                  site
    pos.py sell POS N [DATE]      N sales at POS "POS", paid cash and
                                  posted; prints one line per sale:
                                  "sale <receipt number> <move number> <total>"
    pos.py new-year YEAR PREFIX   a fiscal year YEAR with its periods and
                                  its own account-move counter, numbering
                                  with PREFIX

Any failure ends with a traceback and a non-zero exit status.
"""

import contextlib
import datetime
import os
import sys
from decimal import Decimal

from proteus import Model, config as proteus_config

DB = os.environ.get('TRYTON_DB', 'postgres')
SITES = os.environ.get('TRYTON_SITES', 'main,shop1,shop2').split(',')


@contextlib.contextmanager
def connected():
    if os.environ.get('TRYTON_URL'):
        with proteus_config.set_xmlrpc_session(
                os.environ['TRYTON_URL'], os.environ.get('TRYTON_USER', 'admin'),
                os.environ.get('TRYTON_PASSWORD')):
            yield
    else:
        proteus_config.set_trytond(DB)
        yield


def seed(year):
    from trytond.modules.account.tests.tools import (
        create_chart, create_fiscalyear, create_tax, get_accounts)
    from trytond.modules.account_invoice.tests.tools import (
        set_fiscalyear_invoice_sequences)
    from trytond.modules.company.tests.tools import create_company

    create_company()
    create_chart()
    fiscalyear = set_fiscalyear_invoice_sequences(create_fiscalyear(
            today=(datetime.date(year, 1, 1), datetime.date(year, 12, 31))))
    fiscalyear.click('create_period')
    accounts = get_accounts()

    tax = create_tax(Decimal('.21'))
    tax.save()
    Category = Model.get('product.category')
    category = Category(name="Goods")
    category.accounting = True
    category.account_revenue = accounts['revenue']
    category.customer_taxes.append(tax)
    category.save()

    Uom = Model.get('product.uom')
    Template = Model.get('product.template')
    unit, = Uom.find([('name', '=', 'Unit')])
    for name, price in [('bread', '2.4200'), ('coffee', '3.6300')]:
        template = Template(name=name)
        template.default_uom = unit
        template.type = 'goods'
        template.salable = True
        template.account_category = category
        template.gross_price = Decimal(price)
        template.save()

    Journal = Model.get('account.journal')
    Location = Model.get('stock.location')
    POS = Model.get('sale.point')
    PaymentMethod = Model.get('sale.point.payment.method')
    SequenceStrict = Model.get('ir.sequence.strict')
    SequenceType = Model.get('ir.sequence.type')
    journal, = Journal.find([('type', '=', 'revenue')], limit=1)
    storage, = Location.find([('code', '=', 'STO')])
    customer, = Location.find([('code', '=', 'CUS')])
    pos_type, = SequenceType.find([('name', '=', "POS")], limit=1)
    for site in SITES:
        pos = POS(name=site)
        pos.journal = journal
        pos.sequence = SequenceStrict(name="POS " + site, company=pos.company)
        pos.sequence.sequence_type = pos_type
        pos.sequence.save()
        pos.storage_location = storage
        pos.customer_location = customer
        pos.save()
    cash = PaymentMethod(name="Cash")
    cash.account = accounts['cash']
    cash.cash = True
    cash.save()


def sell(pos_name, n, date=None):
    POS = Model.get('sale.point')
    Product = Model.get('product.product')
    PaymentMethod = Model.get('sale.point.payment.method')
    Sale = Model.get('sale.point.sale')
    pos, = POS.find([('name', '=', pos_name)])
    products = Product.find([('salable', '=', True)], order=[('id', 'ASC')])
    cash, = PaymentMethod.find([('name', '=', "Cash")])
    for i in range(n):
        sale = Sale(point=pos)
        if date:
            sale.date = date
        for k, product in enumerate(products):
            line = sale.lines.new()
            line.product = product
            line.quantity = 1 + (i + k) % 3
        sale.save()
        pay = sale.click('pay')
        pay.form.method = cash
        while pay.state != pay.end_state:
            pay.execute('pay')
        sale.click('post')
        sale.reload()
        assert sale.state == 'posted', sale.state
        print(f"sale {sale.number} {sale.move.number} {sale.total}",
            flush=True)


def new_year(year, prefix):
    from trytond.modules.account.tests.tools import create_fiscalyear
    from trytond.modules.account_invoice.tests.tools import (
        set_fiscalyear_invoice_sequences)
    fiscalyear = create_fiscalyear(
        today=(datetime.date(year, 1, 1), datetime.date(year, 12, 31)))
    fiscalyear.move_sequence.prefix = prefix
    fiscalyear.move_sequence.save()
    fiscalyear = set_fiscalyear_invoice_sequences(fiscalyear)
    fiscalyear.click('create_period')
    print(f"fiscal year {fiscalyear.name} move sequence "
        f"{fiscalyear.move_sequence.id}", flush=True)


def main(argv):
    with connected():
        if argv[:1] == ['seed'] and len(argv) == 2:
            seed(int(argv[1]))
        elif argv[:1] == ['sell'] and len(argv) in (3, 4):
            date = (datetime.date.fromisoformat(argv[3])
                if len(argv) == 4 else None)
            if date:
                # Numbers take the year of the sale's date (the context's
                # date), as for a till whose sales are dated that day.
                with proteus_config.get_config().set_context(date=date):
                    sell(argv[1], int(argv[2]), date)
            else:
                sell(argv[1], int(argv[2]), date)
        elif argv[:1] == ['new-year'] and len(argv) == 3:
            new_year(int(argv[1]), argv[2])
        else:
            sys.exit(__doc__)


if __name__ == '__main__':
    main(sys.argv[1:])
