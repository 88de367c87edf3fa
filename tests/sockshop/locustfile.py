# Simulated SockShop shoppers for the scenario of tests/src/sockshop.rs: they browse the
# catalogue, look at an item, log in, add to the cart and order, as the SockShop load test
# does. Run by `flowtrace_tests::sockshop::load` (headless, inside the load-test pod).
from locust import HttpUser, between, task


class Shopper(HttpUser):
    wait_time = between(0.05, 0.2)

    @task(4)
    def browse(self):
        self.client.get("/")

    @task(3)
    def item(self):
        self.client.get("/catalogue/3", name="/catalogue/[id]")

    @task(1)
    def login(self):
        self.client.get("/login")

    @task(2)
    def add_to_cart(self):
        self.client.post("/cart", data="item=3&qty=1")

    @task(1)
    def order(self):
        self.client.post("/orders", data="basket=1")
